"""What both stages share: the starting model, trainer defaults, metrics CSV, checkpoints, the final save."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from surgery_r1_ros.model import BUILTIN_MODEL_DIR

from .config import RunConfig, save_config

log = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
FINAL_DIR = "final"


def resolve_model(name: str) -> Path:
    """``builtin`` -> the packaged model; otherwise a model folder (a stage's ``final/`` or a checkpoint)."""
    path = BUILTIN_MODEL_DIR if name == "builtin" else Path(name)
    if path.is_dir() and (path / FINAL_DIR / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / FINAL_DIR  # a previous stage's output folder
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {name}: no config.json in {path} (give a model folder or 'builtin')")
    return path


def load_start_model(name: str, checkpoint: str | None = None):
    """(model, processor) of the run's starting point, in float32 for training on CPU (bf16 comes from the config).

    When resuming a full fine-tuning run, the weights come from the checkpoint through ``from_pretrained``:
    transformers 5 saves them under the original Qwen2.5-VL key names, which the Trainer's own resume
    (``load_state_dict(strict=False)``) silently skips, so the language model would restart from scratch.
    A LoRA checkpoint holds only the adapter, which the Trainer restores itself.
    """
    from surgery_r1_ros.model import load_model

    full = checkpoint is not None and (Path(checkpoint) / "model.safetensors").is_file()
    loaded = load_model(Path(checkpoint) if full else resolve_model(name), device="cpu")
    loaded.model.train()
    return loaded.model, loaded.processor


def report_to() -> list[str]:
    """TensorBoard when it is installed; our own CSV always (MetricsCSV)."""
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def trainer_defaults(output_dir: str) -> dict[str, Any]:
    """``TrainingArguments`` every run needs; a config's ``trainer`` block overrides them."""
    cuda = _cuda_available()
    return {
        "output_dir": output_dir,
        "save_strategy": "steps",
        "save_steps": 100,
        "save_total_limit": 3,
        "logging_steps": 5,
        "report_to": report_to(),
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "bf16": cuda,
        "seed": 0,
        "use_cpu": not cuda,
    }


def freeze_vision(model, keep_merger: bool = False) -> None:
    """Freeze the vision tower (patch embedding, blocks and, unless ``keep_merger``, the merger that projects
    its tokens into the language model), and log how many parameters were frozen.

    After vision pre-training the tower's tokens already say what is where; SFT and GRPO then train the
    language model to read them, and cannot wash the image out of the tokens (what blinded the first model).
    """
    visual = model.get_base_model().model.visual if hasattr(model, "get_base_model") else model.model.visual
    visual.requires_grad_(False)
    if keep_merger:
        visual.merger.requires_grad_(True)
    frozen = sum(p.numel() for p in visual.parameters() if not p.requires_grad)
    log.info("vision tower frozen (%d parameters)%s", frozen, "; its merger trains" if keep_merger else "")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class MetricsCSV(TrainerCallback):
    """Every logged metric as a CSV row (step, epoch, time, then the metric columns), kept across resumes.

    On resume, rows logged after the checkpoint being resumed (lost work) are dropped first, so the file
    reads as one uninterrupted run.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r.get("step") or 0)) <= resume_step]
        elif self.path.is_file():
            self.path.unlink()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        row.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


def last_checkpoint(output_dir: str | Path) -> str | None:
    out = Path(output_dir)
    return get_last_checkpoint(str(out)) if out.is_dir() else None


def checkpoint_step(checkpoint: str | None) -> int | None:
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return int(state["global_step"])


def prepare_output(config: RunConfig, resume: bool) -> str | None:
    """Create the output folder, record the config, and find the checkpoint to resume from (if asked)."""
    out = Path(config.output_dir)
    checkpoint = last_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", out)
    if not resume and out.is_dir() and last_checkpoint(out):
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue, or choose a new output_dir")
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "run_config.yaml")
    return checkpoint


def save_final(trainer, processor, config: RunConfig) -> Path:
    """The trained model (LoRA merged in) and its processor as one self-contained safetensors folder."""
    final = Path(config.output_dir) / FINAL_DIR
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = trainer.accelerator.unwrap_model(model) if hasattr(trainer, "accelerator") else model
    if trainer.is_world_process_zero():
        model.save_pretrained(final, safe_serialization=True)
        processor.save_pretrained(final)
    trainer.accelerator.wait_for_everyone()
    return final


def lora_config(config: RunConfig):
    if config.lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        task_type="CAUSAL_LM",
    )
