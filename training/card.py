"""The built-in model's model card (README.md beside its weights), written from the pipeline's records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .builtin import TRAINING_STAGES

COLUMNS = ("accuracy", "f_score", "miou_legacy", "miou", "coherence_rate", "format_rate")
ROWS = (("untrained", "untrained (random init)"), ("sft", "SFT only"), ("sft_grpo", "SFT + GRPO"))


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def ablation_table(results: dict[str, dict], mode: str) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " | n |", "|---" * (len(COLUMNS) + 2) + "|"]
    for key, label in ROWS:
        r = results.get(f"{key}/{mode}")
        if r:
            lines.append(f"| {label} | " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + f" | {r.get('n')} |")
    return "\n".join(lines)


def reliance_table(reliance: dict[str, dict]) -> str:
    lines = ["| model | test loss, own frames | test loss, shuffled frames | gap | n |", "|---|---|---|---|---|"]
    for key, label in ROWS:
        r = reliance.get(key)
        if r:
            lines.append(f"| {label} | {r['loss_true']:.3f} | {r['loss_shuffled']:.3f} | {r['gap']:+.3f} | {r['n']} |")
    return "\n".join(lines)


def model_card(state: dict, spec: dict, config_path: Path, machine: str) -> str:
    seconds = sum(s.get("seconds", 0.0) for s in state.values())
    init = state.get("init", {}).get("result", {})
    mix = state.get("mix", {}).get("result", {})
    results = state.get("eval", {}).get("result", {})
    stages = []
    for name in TRAINING_STAGES:
        s = state.get(name)
        if not s:
            continue
        r = s["result"]
        cfg = r["config"]
        t = cfg["trainer"]
        stages.append(
            f"| {name} | {cfg['stage']} | {', '.join(cfg['data']['kinds'])} | {r['steps']} | "
            f"{t.get('per_device_train_batch_size')} | {t.get('learning_rate')} | {s['seconds'] / 60:.1f} |"
        )
    synth = state.get("synth", {}).get("result", {})
    train, test = synth.get("train", {}), synth.get("test", {})
    return f"""# Surgery-R1 built-in model

A small Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, {init.get("parameters", 0) / 1e6:.1f} M parameters,
vocabulary {init.get("vocab")}, dims {init.get("dims")}) trained from random weights on synthetic endoscope
scenes with this repository's two-stage pipeline: SFT on the Surgery-R1 mix (Visual-QA, Grounding-QA,
chain of thought), then GRPO with format, accuracy, IoU and coherence rewards. It is the default model of
`make demo`, the ROS 2 node and the tests. **It has only ever seen synthetic frames: it is a working
stand-in for a fine-tuned Qwen2.5-VL-3B/7B, not a surgical model.**

## Data
- train: synthetic, {train.get("sequences")} sequences x {train.get("frames_per_sequence")} frames,
  seed {train.get("seed")}, {train.get("size")} px:
  {mix.get("train_frames")} frames, {mix.get("train_questions")} questions, {mix.get("records")} mix records.
- test (held out, unseen seed {test.get("seed")}): {mix.get("test_frames")} frames,
  {mix.get("test_questions")} questions.
- pixel normalisation: the training frames' own mean {init.get("image_mean")} / std {init.get("image_std")}.

## Training
| stage | trainer | record kinds | steps | batch | lr | minutes |
|---|---|---|---|---|---|---|
{chr(10).join(stages)}

Total time of the stages: {seconds / 60:.1f} min on {machine} (a resumed stage counts its last run).
Config: `{config_path.name}`.

## Results on the held-out synthetic test split
Direct answer (`<answer>` + `<box>`, the runtime's fast mode):

{ablation_table(results, "direct")}

With reasoning (`<think>` first):

{ablation_table(results, "reason")}

Does it look at the image? Teacher-forced loss on test grounding questions with each question's own frame
and with frames shuffled between questions (`training/reliance.py`); a gap near 0 means the answers come
from the text prior, not from the frame:

{reliance_table(state.get("reliance", {}).get("result", {}))}

Metric definitions: `training/evaluate.py` (and `definitions` in each report.json). `miou_legacy` is the
Surgical-VQLA score, kept for comparison with published tables; `miou` is the true IoU.

Learning curves: `sft_a_metrics.csv`, `sft_b_metrics.csv`, `rft_metrics.csv` beside the weights (every
logged loss, reward and learning rate); `make model` also plots them to `runs/builtin/<stage>/`.

## Reproduce
    make model            # = surgery-r1 train builtin --out surgery_r1_ros/resources/builtin_model
    surgery-r1 eval --data runs/builtin/data/test --split all --out reports/builtin [--reasoning]
"""
