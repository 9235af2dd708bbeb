"""The built-in model's model card (README.md beside its weights), written from the pipeline's records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery_r1_ros.protocol import BOX_DIGITS, build_target
from surgery_r1_ros.vocab import QuestionKind

from .builtin import REFITS, TRAINING_STAGES

COLUMNS = ("accuracy", "f_score", "miou_legacy", "miou", "coherence_rate", "claimed_coherence_rate", "true_claims_rate",
           "subject_rate", "format_rate")  # fmt: skip
# Each row after SFT + GRPO adds its stage to the row above (the stages that ran, in pipeline order).
ROWS = (("untrained", "untrained (random init)"), ("sft", "SFT only"), ("sft_grpo", "SFT + GRPO"),
        *((r.name, f"+ {r.label}") for r in REFITS))  # fmt: skip
RELIANCE_ROWS = (("untrained", "untrained (random init)"), ("vision", "after stage 0 (LM untrained)"), *ROWS[1:])
FRAMES = (("own", "own frames"), ("swapped", "frames of another sequence"), ("degraded", "degraded frames"))
DENSE = ("cover", "tool_cover", "tip", "state", "tool_state", "quadrant")
_LATEST_FIRST = [(r.name, r.label) for r in reversed(REFITS)] + [("sft_grpo", "SFT + GRPO")]
KIND_ROWS = [
    (f"{key}/{mode}", f"{label}, {text}")
    for key, label in _LATEST_FIRST
    for mode, text in (("direct", "direct"), ("reason", "reasoning"))
] + [("sft/direct", "SFT only, direct")]


def _own_reasoning(r: dict) -> str:
    own = r.get("own_reasoning_rows", 0)
    return f" + {own} own reasoning" if own else ""


def _refit_row(name: str, stage: dict, trained: str, steps: str, size: str) -> str:
    """A refit's row in the stage table: what it trains, on which kinds, its steps, its data, lr and minutes."""
    r = stage["result"]
    return (f"| {name} | {trained} | {', '.join(r['kinds'])}{_own_reasoning(r)} | {steps} | {size} | {r['lr']} | "
            f"{stage['seconds'] / 60:.1f} |")  # fmt: skip


def _readout_row(name: str, stage: dict) -> str:
    """The stage table's row of a readout refit (its steps: the best step kept)."""
    r = stage["result"]
    label = "answer, tag, name and state rows of the output head refit"
    return _refit_row(name, stage, label, str(r["best_step"]), f"{r['positions']} positions")


def _readout_text(r: dict) -> str:
    return """; then, with everything else frozen,
the output head's rows of the answer labels, protocol tags, instrument names and state words are refit to what
the last layer holds (`training/readout.py`: a convex fit on cached hidden states, the best step chosen on
held-out training frames; the readout row's steps are that step)"""


def _last_layer_row(name: str, stage: dict) -> str:
    """The stage table's row of a last-layer refit."""
    r = stage["result"]
    return _refit_row(name, stage, "last decoder layer + final norm (SFT loss, cached inputs)",
                      f"{r['best_step']} of {r['steps']}", f"{r['rows']} rows")  # fmt: skip


def _last_layer_text(r: dict) -> str:
    boxes = "held to the model's own box distribution" if r["keep_boxes"] else "fitted to the label boxes"
    attends = ""
    if r.get("box_attention"):
        questions = r.get("box_attention_questions")
        which = f" of {' and '.join(questions)} questions" if questions else ""
        attends = f""", its first attention head also trained to look at the question's box while it writes the
answer and box, and the reasoning's sentences about the question's subject{which} (box attention, weight
{r["box_attention"]}: held-out attention mass on the box {r["box_attention_mass_before"]} ->
{r["box_attention_mass_after"]})"""
    return f"""; then the language model's last decoder layer and final norm are trained on the mix with
everything else frozen, on cached inputs of that layer, box positions {boxes}{attends}
(`training/last_layer.py`; the step kept is the one with the lowest loss on held-out training frames)"""


# Per refit block: its row in the stage table, its clause in the card's opening paragraph, and that clause when
# the block's refit runs a second time.
REFIT_ROWS = {
    "readout": (_readout_row, _readout_text,
                "; then those output head rows are refit once more, to what the layers below them now hold"),
    "last_layer": (_last_layer_row, _last_layer_text, "; then that layer is trained once more, the same way"),
}  # fmt: skip


def refit_stages(state: dict) -> tuple[list[str], str]:
    """The stage-table rows and the opening paragraph's clauses of the refits that ran, in pipeline order."""
    rows, text, seen = [], "", set()
    for refit in REFITS:
        stage = state.get(refit.name)
        if not stage:
            continue
        row, clause, again = REFIT_ROWS[refit.block]
        rows.append(row(refit.name, stage))
        text += again if refit.block in seen else clause(stage["result"])
        seen.add(refit.block)
    return rows, text


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def ablation_table(results: dict[str, dict], mode: str) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " | n |", "|---" * (len(COLUMNS) + 2) + "|"]
    for key, label in ROWS:
        r = results.get(f"{key}/{mode}")
        if r:
            lines.append(f"| {label} | " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + f" | {r.get('n')} |")
    return "\n".join(lines)


def state_claims_table(results: dict[str, dict]) -> str:
    """Reasoning mode, state questions: the state the reasoning names against the truth and the answer."""
    columns = ("state_claims_rate", "state_claim_accuracy", "state_agreement_rate")
    lines = ["| model | state accuracy | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for key, label in ROWS:
        r = results.get(f"{key}/reason")
        if r and r.get("state_claims_rate") is not None:
            state = (r.get("accuracy_by_kind") or {}).get(str(QuestionKind.STATE))
            lines.append(f"| {label} | {_fmt(state)} | " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def kind_table(results: dict[str, dict], keys: list[tuple[str, str]]) -> str:
    """Accuracy per question kind (``accuracy_by_kind`` of each evaluation report)."""
    kinds = [str(k) for k in QuestionKind]
    lines = ["| model | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for key, label in keys:
        acc = (results.get(key) or {}).get("accuracy_by_kind")
        if acc:
            lines.append(f"| {label} | " + " | ".join(_fmt(acc.get(k)) for k in kinds) + " |")
    return "\n".join(lines)


def final_model(results: dict[str, dict]) -> str:
    """The key of the installed model among the evaluated ones (the last stage that ran)."""
    return next((key for key, _ in reversed(ROWS) if f"{key}/direct" in results), "sft_grpo")


def frames_table(results: dict[str, dict], model: str) -> str:
    """The final model on its own, swapped and degraded frames (direct mode)."""
    own = results.get(f"{model}/direct")
    lines = ["| frames | accuracy | change | miou | change | n |", "|---|---|---|---|---|---|"]
    for variant, label in FRAMES:
        r = results.get(f"{model}/direct" + ("" if variant == "own" else f"/{variant}"))
        if r and own:
            lines.append(f"| {label} | {r['accuracy']:.3f} | {r['accuracy'] - own['accuracy']:+.3f} | "
                         f"{r['miou']:.3f} | {r['miou'] - own['miou']:+.3f} | {r['n']} |")  # fmt: skip
    return "\n".join(lines)


def state_table(results: dict[str, dict], model: str) -> str:
    """State questions per instrument (``state_by_subject``), the final model in direct mode, own and swapped frames."""
    own = (results.get(f"{model}/direct") or {}).get("state_by_subject") or {}
    swapped = (results.get(f"{model}/direct/swapped") or {}).get("state_by_subject") or {}
    lines = ["| instrument | n | accuracy | swapped frames | prior | different answers |", "|---|---|---|---|---|---|"]
    for subject, r in own.items():
        moved = _fmt((swapped.get(subject) or {}).get("accuracy"))
        lines.append(f"| {subject} | {r['n']} | {r['accuracy']:.3f} | {moved} | {r['prior']:.3f} | {r['answers']} |")
    return "\n".join(lines)


def dense_table(vision: dict) -> str:
    """Stage 0's held-out per-cell scores before and after, beside always guessing the commonest value."""
    before, after = vision.get("before", {}), vision.get("after", {})
    lines = ["| per-cell target | random tower | after stage 0 | majority guess |", "|---|---|---|---|"]
    rows = [(name, f"{name} accuracy") for name in DENSE]
    rows += [(f"read_{name}", f"{name} per instrument, read off its cells") for name in ("quadrant", "tool_state")]
    for key, label in rows:
        if f"{key}_acc" in after:
            lines.append(f"| {label} | {_fmt(before.get(f'{key}_acc'))} | {_fmt(after[f'{key}_acc'])} | "
                         f"{_fmt(after.get(f'{key}_majority'))} |")  # fmt: skip
    for name in ("pos_mae", "box_mae"):
        if name in after:
            lines.append(f"| {name} (fraction of the frame) | {_fmt(before.get(name))} | {_fmt(after[name])} | - |")
    return "\n".join(lines)


def reliance_table(reliance: dict[str, dict]) -> str:
    lines = ["| model | test loss, own frames | test loss, shuffled frames | gap | n |", "|---|---|---|---|---|"]
    for key, label in RELIANCE_ROWS:
        r = reliance.get(key)
        if r:
            lines.append(f"| {label} | {r['loss_true']:.3f} | {r['loss_shuffled']:.3f} | {r['gap']:+.3f} | {r['n']} |")
    return "\n".join(lines)


def rewards_phrase(rewards: dict[str, float]) -> str:
    """The GRPO rewards as the card states them: the weighted ones, and those only logged (weight 0)."""
    used = [f"{name} {weight:g}" for name, weight in rewards.items() if weight]
    logged = [name for name, weight in rewards.items() if not weight]
    text = f"rewards {', '.join(used)}"
    return text + (f" ({', '.join(logged)} computed and logged, weight 0)" if logged else "")


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
        trainer = cfg.get("stage", "dense (Trainer)")
        kinds = ", ".join(cfg["data"]["kinds"]) if "data" in cfg else "dense ground truth"
        frozen = " (vision frozen)" if cfg.get("freeze_vision") else ""
        frozen = " (vision frozen but its merger)" if cfg.get("train_merger") else frozen
        looks = f" + box attention x{cfg['box_attention']}" if cfg.get("box_attention") else ""
        steps = r["steps"]
        if r.get("stopped_by_time"):
            steps = f"{steps} of {t.get('max_steps')}, stopped by its time budget"
        stages.append(
            f"| {name} | {trainer}{looks}{frozen} | {kinds} | {steps} | "
            f"{t.get('per_device_train_batch_size')} | {t.get('learning_rate')} | {s['seconds'] / 60:.1f} |"
        )
    refit_rows, refit = refit_stages(state)
    rft_rewards = state.get("rft", {}).get("result", {}).get("config", {}).get("rewards", {})
    stages += refit_rows
    synth = state.get("synth", {}).get("result", {})
    train, test = synth.get("train", {}), synth.get("test", {})
    return f"""# Surgery-R1 built-in model

A small Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, {init.get("parameters", 0) / 1e6:.1f} M parameters,
vocabulary {init.get("vocab")}, dims {init.get("dims")}) trained from random weights on synthetic endoscope
scenes with this repository's pipeline: stage 0, vision pre-training on the renderer's dense ground truth
(the part a real Qwen2.5-VL brings from its own pre-training: `training/vision_pretrain.py`), then the
paper's two stages with the vision tower frozen: SFT on the Surgery-R1 mix (Visual-QA, Grounding-QA, chain
of thought), then GRPO with {rewards_phrase(rft_rewards)}{refit}. It is the default model of
`make demo`, the ROS 2 node and the tests. **It has only ever seen synthetic frames: it is a working
stand-in for a fine-tuned Qwen2.5-VL-3B/7B, not a surgical model.**

## Output
One protocol in every mode (`surgery_r1_ros/protocol.py`): with reasoning
`{build_target("kidney", (74, 22, 241, 200), "...")}`, in direct mode the same without `<think>`. The box is in
the model's input pixels, each number zero-padded to {BOX_DIGITS} digits, so the digits it writes go in
place-value order.

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

## Stage 0: what the vision tower learnt (held-out frames, per 28x28-pixel image token)
{dense_table(state.get("vision", {}).get("result", {}))}

## Results on the held-out synthetic test split
Direct answer (`<answer>` + `<box>`, the runtime's fast mode):

{ablation_table(results, "direct")}

With reasoning (`<think>` first):

{ablation_table(results, "reason")}

State questions with reasoning: how often the reasoning names a state, how often that state is the true one,
and how often the answer is the state the reasoning names (reasoning that names one state and answers another
does not explain its answer):

{state_claims_table(results)}

Accuracy by question type:

{kind_table(results, KIND_ROWS)}

Does it read the frame? The final model, direct mode, on its own frames, on frames of another sequence (a
model that reads the image must get worse) and on degraded frames (JPEG quality 45, 20% darker, sensor
noise: `training/augment.degrade`; it should not get much worse):

{frames_table(results, final_model(results))}

State questions per instrument (final model, direct mode, its own frames and frames of another sequence).
The prior is the accuracy of always giving the instrument's commonest true state. An instrument whose
accuracy does not fall with another sequence's frames, or that gets one answer whatever the frame, has its
state guessed, not read from the frame:

{state_table(results, final_model(results))}

The same question asked of each stage: teacher-forced loss on test grounding questions with each question's
own frame and with frames shuffled between questions (`training/reliance.py`); a gap near 0 means the answers
come from the text prior, not from the frame. SFT stages fail when the gap is below their `min_reliance_gap`:

{reliance_table(state.get("reliance", {}).get("result", {}))}

Metric definitions: `surgery_r1_ros/scoring.py` (and `definitions` in each report.json). `miou_legacy` is the
Surgical-VQLA score, kept for comparison with published tables; `miou` is the true IoU. `coherence_rate` counts
reasoning that makes no checkable position claim about the question's subject as coherent;
`claimed_coherence_rate` leaves it out and checks the claims against the predicted box, `true_claims_rate` checks
the same claims against the true box (reasoning can be right about the frame next to a wrong box), and
`subject_rate` is how often the reasoning names the instrument asked about at all.

Learning curves: `vision_metrics.csv`, `sft_a_metrics.csv`, `sft_b_metrics.csv`, `rft_metrics.csv` beside the
weights (every logged loss, reward and learning rate); `make model` also plots them to `runs/builtin/<stage>/`.

## Reproduce
    make model            # = surgery-r1 train builtin --out surgery_r1_ros/resources/builtin_model
    surgery-r1 eval --data runs/builtin/data/test --split all --out reports/builtin [--reasoning] [--frames swapped]
"""
