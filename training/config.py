"""Run configuration for both stages: one YAML file per run.

A config names the starting model, the data, the output folder, optional LoRA settings, the GRPO
rewards, and a ``trainer`` block passed verbatim to TRL's ``SFTConfig`` / ``GRPOConfig``::

    stage: sft                       # or rft
    model: builtin                   # "builtin" (the packaged model) or a model folder
    output_dir: runs/sft_builtin
    data:
      mix: data/builtin/train_mix.jsonl   # a `surgery-r1 data mix` file ...
      dataset: null                       # ... or a VQLA folder, mixed on the fly
      split: train
      kinds: [grounding, vqa, cot]        # which record kinds to train on
      limit: null                         # keep only the first N questions (after shuffling)
      seed: 0
      augment: false                      # photometric augmentation (colour, blur, noise, JPEG)
    lora: null                       # or {r: 16, alpha: 32, dropout: 0.05, target_modules: <regex>}
    rewards: {format: 0.5, accuracy: 1.0, iou: 1.0, coherence: 0.5}   # rft only, name -> weight
    freeze_vision: false             # true: train the language model only (after vision pre-training)
    train_merger: false              # with freeze_vision: keep the merger (the tower's projection) trainable
    box_attention: 0.0               # sft only: weight of the loss that points attention at the box (box_attention.py)
    trainer: {learning_rate: 1e-3, max_steps: 500, ...}

Relative paths are relative to the current directory. ``--config NAME`` also finds the configs shipped
in ``training/configs`` by name (``builtin_sft``, ``qwen3b_sft``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = ("sft", "rft")
# GRPO knobs whose TRL defaults changed between versions or do not suit us: each RFT config must set them.
RFT_REQUIRED = ("num_generations", "beta", "loss_type", "max_completion_length", "temperature")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class DataConfig:
    mix: str | None = None
    dataset: str | None = None
    split: str = "train"
    kinds: list[str] = field(default_factory=lambda: ["grounding", "vqa", "cot"])
    limit: int | None = None
    seed: int = 0
    augment: bool = False  # photometric augmentation of the frames (training/augment.py)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = LORA_TARGETS


@dataclass
class RunConfig:
    stage: str
    model: str
    output_dir: str
    data: DataConfig
    trainer: dict[str, Any]
    lora: LoraConfig | None = None
    rewards: dict[str, float] = field(default_factory=dict)
    freeze_vision: bool = False  # train the language model only (after vision pre-training)
    source: str | None = None  # the file it was read from
    train_merger: bool = False  # with freeze_vision: the merger (the tower's projection) still trains
    box_attention: float = 0.0  # sft: weight of the box attention loss (training/box_attention.py); 0 = off

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "model": self.model,
            "output_dir": self.output_dir,
            "data": vars(self.data),
            "lora": vars(self.lora) if self.lora else None,
            "rewards": dict(self.rewards),
            "freeze_vision": self.freeze_vision,
            "train_merger": self.train_merger,
            "box_attention": self.box_attention,
            "trainer": dict(self.trainer),
        }


def find_config(name: str | Path) -> Path:
    """A config file by path, or by the name of a shipped config (with or without ``.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {name} not found (not a file, nor a shipped config: {known})")


def check_keys(section: str, values: dict, allowed: set[str]) -> None:
    """Fail, naming the section and the allowed keys, when ``values`` has a key outside ``allowed``."""
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def from_dict(raw: dict[str, Any], source: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Validate a config mapping; ``overrides`` (``{"trainer.max_steps": 5, "output_dir": ...}``) win."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in (overrides or {}).items():
        head, _, tail = dotted.partition(".")
        if tail:
            raw.setdefault(head, {})
            raw[head] = {**(raw[head] or {}), tail: value}
        else:
            raw[head] = value
    where = source or "config"
    check_keys(where, raw, {"stage", "model", "output_dir", "data", "trainer", "lora", "rewards", "freeze_vision",
                        "train_merger", "box_attention"})  # fmt: skip
    stage = raw.get("stage")
    if stage not in STAGES:
        raise ValueError(f"{where}: 'stage' must be one of {', '.join(STAGES)}, got {stage!r}")
    for key in ("model", "output_dir"):
        if not raw.get(key):
            raise ValueError(f"{where}: '{key}' is required")
    data_raw = raw.get("data") or {}
    check_keys(f"{where} data", data_raw, set(DataConfig.__dataclass_fields__))
    data = DataConfig(**data_raw)
    if not (data.mix or data.dataset):
        raise ValueError(f"{where}: data needs 'mix' (a JSONL file) or 'dataset' (a VQLA folder)")
    bad = sorted(set(data.kinds) - {"vqa", "grounding", "cot"})
    if bad or not data.kinds:
        raise ValueError(f"{where}: data.kinds must be a non-empty subset of vqa, grounding, cot (got {data.kinds})")
    lora = None
    if raw.get("lora"):
        check_keys(f"{where} lora", raw["lora"], set(LoraConfig.__dataclass_fields__))
        lora = LoraConfig(**raw["lora"])
    trainer = dict(raw.get("trainer") or {})
    rewards = {str(k): float(v) for k, v in (raw.get("rewards") or {}).items()}
    if stage == "rft":
        missing = [k for k in RFT_REQUIRED if k not in trainer]
        if missing:
            raise ValueError(f"{where}: an RFT config must set trainer.{', trainer.'.join(missing)} explicitly")
        if not rewards:
            raise ValueError(f"{where}: an RFT config needs 'rewards' (name -> weight)")
    freeze, merger = bool(raw.get("freeze_vision", False)), bool(raw.get("train_merger", False))
    if merger and not freeze:
        raise ValueError(f"{where}: train_merger applies with freeze_vision: true (unfrozen, the merger trains anyway)")
    box_attention = float(raw.get("box_attention") or 0.0)
    if box_attention < 0 or (box_attention and stage != "sft"):
        raise ValueError(f"{where}: box_attention is a non-negative loss weight of SFT stages, got {box_attention}")
    return RunConfig(stage, str(raw["model"]), str(raw["output_dir"]), data, trainer, lora, rewards, freeze, source,
                     merger, box_attention)  # fmt: skip


def load_config(name: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a YAML run config."""
    path = find_config(name)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return from_dict(raw, str(path), overrides)


def save_config(config: RunConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    return path
