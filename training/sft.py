"""Stage 1: supervised fine-tuning on the Surgery-R1 mix with TRL's SFTTrainer.

Rows are (frame, question, prompt mode, target completion); ``encode_prompt`` masks everything but the
completion and its <|im_end|>, so the loss is on the answer only. Full fine-tuning by default, LoRA on
the language model when the config has a ``lora`` block. Checkpoints are safetensors; ``resume=True``
continues from the output folder's last checkpoint (weights, optimizer, scheduler, RNG and data order).

    surgery-r1 train sft --config builtin_sft [--resume]
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .common import (
    METRICS_CSV,
    MetricsCSV,
    checkpoint_step,
    freeze_vision,
    load_start_model,
    lora_config,
    prepare_output,
    save_final,
    trainer_defaults,
)
from .config import RunConfig
from .dataset import ImageCache, SFTCollator, load_records, sft_dataset

log = logging.getLogger(__name__)


def box_attention_trainer(base: type, weight: float) -> type:
    """``base`` (TRL's SFTTrainer) whose loss adds ``weight`` x the box attention loss (box_attention.py)."""
    from .box_attention import box_attention_loss, captured_attention

    class BoxAttentionSFTTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            cells, box_from = inputs.pop("box_cells"), inputs.pop("box_from")
            with captured_attention(self.model) as weights:  # the unwrapped model: hooks see through DDP
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            extra = box_attention_loss(weights, inputs["input_ids"], inputs["labels"], cells, box_from,
                                       self.model.config.image_token_id)  # fmt: skip
            if extra is None:
                return result
            loss, mass = extra
            self._metrics["train" if model.training else "eval"]["box_attention_mass"].append(mass)
            # A per-micro-batch mean: with `num_items_in_batch` the Trainer leaves accumulation to the loss (as TRL
            # does for its router loss)
            loss = weight * loss / (self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1)
            return (result[0] + loss, result[1]) if return_outputs else result + loss

    return BoxAttentionSFTTrainer


def build_sft_trainer(config: RunConfig, checkpoint: str | None = None, callbacks=()):
    """The SFTTrainer for a config (also used by tests and diagnostics)."""
    from trl import SFTConfig, SFTTrainer

    from surgery_r1_ros.model import image_size

    model, processor = load_start_model(config.model, checkpoint)
    if config.box_attention:
        model.set_attn_implementation({"text_config": "eager"})  # SDPA returns no attention weights; same math
    if config.freeze_vision:
        freeze_vision(model, keep_merger=config.train_merger)
    model_size = image_size(processor)
    records = load_records(config.data)
    train = sft_dataset(records, model_size)
    collator = SFTCollator(processor, ImageCache(), seed=config.data.seed, augment=config.data.augment,
                           box_cells=bool(config.box_attention))  # fmt: skip
    settings = {
        **trainer_defaults(config.output_dir),
        "dataset_kwargs": {"skip_prepare_dataset": True},  # the collator tokenizes
        "max_length": None,  # never truncate: a cut target would teach a broken protocol
        "activation_checkpointing": False,  # on by default in TRL: pure overhead for a small model
        **config.trainer,
    }
    args = SFTConfig(**settings)
    trainer_class = box_attention_trainer(SFTTrainer, config.box_attention) if config.box_attention else SFTTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=collator,
        processing_class=processor,
        peft_config=lora_config(config),
        callbacks=[MetricsCSV(Path(config.output_dir) / METRICS_CSV, checkpoint_step(checkpoint)), *callbacks],
    )
    source = config.data.mix or config.data.dataset
    log.info("SFT: %d rows (%s) from %s", len(train), ",".join(config.data.kinds), source)
    return trainer, processor


def run_sft(config: RunConfig, resume: bool = False, callbacks=()) -> Path:
    """Train, save ``output_dir/final`` (safetensors + processor) and the loss curve; returns the final folder."""
    from .plots import plot_training

    checkpoint = prepare_output(config, resume)
    trainer, processor = build_sft_trainer(config, checkpoint, callbacks=callbacks)
    started = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    final = save_final(trainer, processor, config)
    if trainer.is_world_process_zero():
        plot_training(Path(config.output_dir) / METRICS_CSV, Path(config.output_dir) / "loss.png", stage="sft")
        log.info("SFT done in %.0f s: %s", time.time() - started, final)
    return final
