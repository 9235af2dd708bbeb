"""Stage 2: reinforcement fine-tuning with GRPO (TRL's GRPOTrainer), starting from the SFT result.

Each prompt is sampled ``num_generations`` times; the group's rewards (format, answer accuracy, box IoU,
multimodal coherence; ``training.rewards``) are weighted as the config says and normalised within the
group into advantages. The config must set the GRPO knobs explicitly (``num_generations``, ``beta``,
``loss_type``, ``max_completion_length``, ``temperature``): TRL's defaults have changed between versions.

    surgery-r1 train rft --config builtin_rft [--resume]
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
from .dataset import load_records, rft_dataset
from .rewards import reward_functions

log = logging.getLogger(__name__)


def build_rft_trainer(config: RunConfig, checkpoint: str | None = None, callbacks=()):
    """The GRPOTrainer for a config (also used by tests)."""
    from trl import GRPOConfig, GRPOTrainer

    from surgery_r1_ros.model import image_size

    model, processor = load_start_model(config.model, checkpoint)
    if config.freeze_vision:
        freeze_vision(model, keep_merger=config.train_merger)
    model_size = image_size(processor)
    records = load_records(config.data)
    train = rft_dataset(records, model_size)
    funcs, weights = reward_functions(config.rewards)
    settings = {
        **trainer_defaults(config.output_dir),
        "reward_weights": weights,
        "scale_rewards": "group",
        "log_completions": False,
        "activation_checkpointing": False,  # on by default in TRL: pure overhead for a small model
        **config.trainer,
    }
    generation = dict(settings.pop("generation_kwargs", None) or {})
    # Our model's generation config is greedy; sampling for the group must be switched on here.
    generation.setdefault("do_sample", True)
    args = GRPOConfig(generation_kwargs=generation, **settings)
    if args.beta > 0 and config.lora is None:
        # TRL rebuilds the frozen reference model from the policy's own folder: make sure it is a real one.
        model.config._name_or_path = str(_model_folder(config.model))
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=train,
        processing_class=processor,
        peft_config=lora_config(config),
        callbacks=[MetricsCSV(Path(config.output_dir) / METRICS_CSV, checkpoint_step(checkpoint)), *callbacks],
    )
    log.info("GRPO: %d prompts x %d generations, rewards %s", len(train), args.num_generations, config.rewards)
    return trainer, processor


def _model_folder(name: str) -> Path:
    from .common import resolve_model

    return resolve_model(name)


def run_rft(config: RunConfig, resume: bool = False, callbacks=()) -> Path:
    """Train, save ``output_dir/final`` and the reward curves; returns the final folder."""
    from .plots import plot_training

    checkpoint = prepare_output(config, resume)
    trainer, processor = build_rft_trainer(config, checkpoint, callbacks=callbacks)
    started = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    final = save_final(trainer, processor, config)
    if trainer.is_world_process_zero():
        plot_training(Path(config.output_dir) / METRICS_CSV, Path(config.output_dir) / "rewards.png", stage="rft")
        log.info("GRPO done in %.0f s: %s", time.time() - started, final)
    return final
