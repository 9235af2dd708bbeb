"""Surgical-VQLA metrics as the field computes them, plus the true IoU.

``accuracy`` and ``f_score`` follow the published Surgical-VQLA evaluation (sklearn, macro F with
``zero_division=1``). ``legacy_miou`` reproduces that evaluation's box score exactly: boxes normalized
to [0, 1], the pixel "+1" rule applied to normalized coordinates, and the intersection never clamped
for disjoint boxes, so unrelated boxes still score around 0.46. Published tables use it; we report it
beside the true mean IoU, which is what a user should look at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from surgery_r1_ros.boxes import Box, Size, iou


def accuracy(truth: Sequence[str], predicted: Sequence[str]) -> float:
    """Fraction of exact label matches."""
    _check_lengths(truth, predicted)
    return float(accuracy_score(list(truth), list(predicted))) if truth else 0.0


def f_score(truth: Sequence[str], predicted: Sequence[str]) -> float:
    """Macro F-score over the labels seen in truth or prediction (sklearn, zero_division=1)."""
    _check_lengths(truth, predicted)
    if not truth:
        return 0.0
    _, _, f, _ = precision_recall_fscore_support(list(truth), list(predicted), average="macro", zero_division=1)
    return float(f)


def normalize_box(box: Box, size: Size) -> Box:
    """Box as fractions of the image width and height."""
    w, h = size
    return box[0] / w, box[1] / h, box[2] / w, box[3] / h


def legacy_iou(a: Box, b: Box) -> float:
    """The field's per-pair box score on normalized boxes: "+1" rule, intersection never clamped."""
    inter = (min(a[2], b[2]) - max(a[0], b[0]) + 1) * (min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / max(area_a + area_b - inter, 1.0)


def legacy_miou(truth: Sequence[Box], predicted: Sequence[Box], sizes: Sequence[Size]) -> float:
    """Mean legacy score over pairs of pixel boxes, each normalized by its image size."""
    _check_lengths(truth, predicted)
    if not truth:
        return 0.0
    scores = [
        legacy_iou(normalize_box(t, s), normalize_box(p, s)) for t, p, s in zip(truth, predicted, sizes, strict=True)
    ]
    return sum(scores) / len(scores)


def mean_iou(truth: Sequence[Box], predicted: Sequence[Box | None]) -> float:
    """True mean IoU; a missing prediction scores 0."""
    _check_lengths(truth, predicted)
    if not truth:
        return 0.0
    return sum(iou(t, p) if p is not None else 0.0 for t, p in zip(truth, predicted, strict=True)) / len(truth)


@dataclass(frozen=True)
class ClassRow:
    """Per-answer precision, recall, F1 and support."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


def per_class(truth: Sequence[str], predicted: Sequence[str]) -> list[ClassRow]:
    """Per-label table over every label seen in truth or prediction, sorted by support."""
    _check_lengths(truth, predicted)
    labels = sorted(set(truth) | set(predicted))
    if not labels:
        return []
    p, r, f, s = precision_recall_fscore_support(
        list(truth), list(predicted), labels=labels, average=None, zero_division=1
    )
    rows = [
        ClassRow(lab, float(pi), float(ri), float(fi), int(si))
        for lab, pi, ri, fi, si in zip(labels, p, r, f, s, strict=True)
    ]
    return sorted(rows, key=lambda row: (-row.support, row.label))


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"truth has {len(a)} items but prediction has {len(b)}")
