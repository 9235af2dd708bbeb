"""GRPO reward functions: format, answer accuracy, box IoU and multimodal coherence.

Each is a plain TRL reward function ``(completions, **columns) -> list[float | None]``. ``completions``
are strings or chat messages (``[{"role": "assistant", "content": ...}]``); the columns come from the
RFT dataset rows (see ``training.dataset.rft_rows``):

- ``mode``: the prompt mode (``"answer"``, ``"ground"``, ``"reason"``),
- ``answer``: the ground-truth label,
- ``target_box``: the ground-truth box in model-input pixels (or None),
- ``model_size``: ``[width, height]`` of the model's input image (the frame of its boxes),
- ``subject``: the instrument the question is about (None for the organ question).

All of them read completions with ``protocol.parse_output`` and score boxes with ``boxes.iou`` and
``coherence.check_coherence``, the same functions evaluation and the runtime use. A reward that does
not apply to a row (IoU without a box to compare, coherence outside reasoning mode) returns None, which
TRL leaves out of that row's weighted sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from surgery_r1_ros.boxes import iou
from surgery_r1_ros.coherence import check_coherence
from surgery_r1_ros.protocol import PromptMode, parse_output

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


def format_reward(completions: list, mode: list[str], **_: Any) -> list[float]:
    """1 when every part the prompt mode asks for is present and readable (protocol.format_ok), else 0."""
    return [
        1.0 if parse_output(completion_text(c)).format_ok(PromptMode(m)) else 0.0
        for c, m in zip(completions, mode, strict=True)
    ]


def accuracy_reward(completions: list, answer: list[str], **_: Any) -> list[float]:
    """1 when the parsed answer is the ground-truth label, else 0 (missing or unknown answers score 0)."""
    out = []
    for c, truth in zip(completions, answer, strict=True):
        parsed = parse_output(completion_text(c))
        out.append(1.0 if parsed.answer_in_vocabulary and parsed.answer == truth else 0.0)
    return out


def iou_reward(completions: list, target_box: list, **_: Any) -> list[float | None]:
    """True IoU (continuous, 0..1) of the predicted box with the truth; 0 without a readable box.

    None for rows without a ground-truth box (Visual-QA rows), where a box is not asked for.
    """
    out: list[float | None] = []
    for c, truth in zip(completions, target_box, strict=True):
        if truth is None:
            out.append(None)
            continue
        box = parse_output(completion_text(c)).box
        out.append(iou(box, tuple(truth)) if box is not None else 0.0)
    return out


def coherence_score(text: str, model_size: Sequence[int], subject: str | None) -> float:
    """Coherence of one reasoning-mode completion: 1 verified, NO_CLAIM_COHERENCE no claims, 0 contradicted.

    A completion without reasoning or without a readable box scores 0: there is nothing to be coherent with.
    """
    parsed = parse_output(text)
    if not parsed.reasoning or parsed.box is None:
        return 0.0
    result = check_coherence(parsed.reasoning, parsed.box, (int(model_size[0]), int(model_size[1])), subject)
    if not result.coherent:
        return 0.0
    return 1.0 if result.has_claims else NO_CLAIM_COHERENCE


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
