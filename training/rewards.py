"""GRPO reward functions: format, answer accuracy, box IoU and multimodal coherence.

Each is a plain TRL reward function ``(completions, **columns) -> list[float | None]``. ``completions``
are strings or chat messages (``[{"role": "assistant", "content": ...}]``); the columns come from the
RFT dataset rows (see ``training.dataset.rft_rows``):

- ``mode``: the prompt mode (``"answer"``, ``"ground"``, ``"reason"``),
- ``answer``: the ground-truth label,
- ``target_box``: the ground-truth box in model-input pixels (or None),
- ``model_size``: ``[width, height]`` of the model's input image (the frame of its boxes),
- ``subject``: the instrument the question is about (None for the organ question).

All of them read completions with ``grounding.ground`` (parse, clip to the model's image, coherence), the
function evaluation and the runtime use, in the model's input pixels. A reward that does not apply to a row
(IoU without a box to compare, coherence outside reasoning mode) returns None, which TRL leaves out of that
row's weighted sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from surgery_r1_ros.boxes import Size, iou
from surgery_r1_ros.grounding import Grounding, ground
from surgery_r1_ros.protocol import PromptMode

# Coherence reward for reasoning that makes no checkable position claim about its subject: better than a
# contradiction, worse than a verified claim, so the model cannot win by saying nothing about position.
NO_CLAIM_COHERENCE = 0.5


def completion_text(completion: Any) -> str:
    """The text of a completion given as a string or as chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion_text(completion.get("content", ""))
    if isinstance(completion, Sequence):
        parts = []
        for item in completion:
            if isinstance(item, dict) and item.get("type") == "text":
                parts.append(str(item.get("text", "")))
            else:
                parts.append(completion_text(item))
        return "".join(parts)
    return str(completion)


def _column(columns: dict, name: str, n: int) -> list:
    values = columns.get(name)
    if values is None:
        raise KeyError(f"reward needs the dataset column {name!r}; got columns {sorted(columns)}")
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def _read(completion: Any, mode: str, model_size: Sequence[int], subject: str | None = None) -> Grounding:
    size: Size = (int(model_size[0]), int(model_size[1]))
    return ground(completion_text(completion), PromptMode(mode), size, subject=subject)


def format_reward(completions: list, mode: list[str], model_size: list, **_: Any) -> list[float]:
    """1 when every part the prompt mode asks for is present and readable (``Grounding.format_ok``), else 0."""
    return [float(_read(c, m, size).format_ok) for c, m, size in zip(completions, mode, model_size, strict=True)]


def accuracy_reward(completions: list, answer: list[str], model_size: list, **_: Any) -> list[float]:
    """1 when the answer is the ground-truth label, else 0 (missing or unknown answers score 0)."""
    out = []
    for c, truth, size in zip(completions, answer, model_size, strict=True):
        grounded = _read(c, PromptMode.ANSWER, size)
        out.append(1.0 if grounded.answer_in_vocabulary and grounded.answer == truth else 0.0)
    return out


def iou_reward(completions: list, target_box: list, model_size: list, **_: Any) -> list[float | None]:
    """True IoU (0..1) of the box with the truth, both in model-input pixels; 0 without a readable box.

    None for rows without a ground-truth box (Visual-QA rows), where a box is not asked for.
    """
    out: list[float | None] = []
    for c, truth, size in zip(completions, target_box, model_size, strict=True):
        if truth is None:
            out.append(None)
            continue
        box = _read(c, PromptMode.GROUND, size).box
        out.append(iou(box, tuple(truth)) if box is not None else 0.0)
    return out


def coherence_score(text: str, model_size: Sequence[int], subject: str | None) -> float:
    """Coherence of one reasoning-mode completion: 1 verified, NO_CLAIM_COHERENCE no claims, 0 contradicted.

    A completion without reasoning or without a readable box scores 0: there is nothing to be coherent with.
    """
    grounded = _read(text, PromptMode.REASON, model_size, subject)
    if not grounded.reasoning or grounded.coherence is None or not grounded.coherent:
        return 0.0
    return 1.0 if grounded.coherence.has_claims else NO_CLAIM_COHERENCE


def coherence_reward(
    completions: list, mode: list[str], model_size: list, subject: list, **_: Any
) -> list[float | None]:
    """Multimodal coherence: the reasoning's position claims about the subject agree with the predicted box.

    None outside reasoning mode (direct answers have no reasoning to check).
    """
    out: list[float | None] = []
    for c, m, size, subj in zip(completions, mode, model_size, subject, strict=True):
        if PromptMode(m) is not PromptMode.REASON:
            out.append(None)
        else:
            out.append(coherence_score(completion_text(c), size, subj))
    return out


REWARDS: dict[str, Callable[..., list]] = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "iou": iou_reward,
    "coherence": coherence_reward,
}


def reward_functions(weights: dict[str, float]) -> tuple[list[Callable[..., list]], list[float]]:
    """The reward functions and their weights, in the order of ``weights`` (every name must be known)."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {', '.join(unknown)}; known: {', '.join(REWARDS)}")
    if not weights:
        raise ValueError("the RFT config needs at least one reward under 'rewards'")
    names = list(weights)
    return [REWARDS[n] for n in names], [float(weights[n]) for n in names]
