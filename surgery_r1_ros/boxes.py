"""Axis-aligned pixel boxes ``(x1, y1, x2, y2)``: IoU, scaling between image sizes, quadrants."""

from __future__ import annotations

from collections.abc import Sequence

Box = tuple[float, float, float, float]
Size = tuple[int, int]  # (width, height)
MIN_SIDE, MAX_SIDE = 64, 4096  # frame sizes the synthetic data and bag tools accept


def parse_size(text: str) -> Size:
    """``"1280x1024"`` -> ``(1280, 1024)``, each side within MIN_SIDE..MAX_SIDE pixels."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 1280x1024") from None
    if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
        raise ValueError(f"size {text!r}: width and height must be between {MIN_SIDE} and {MAX_SIDE}")
    return w, h


def as_box(values: Sequence[float]) -> Box:
    """Validate four numbers as a box with x1 <= x2 and y1 <= y2."""
    if len(values) != 4:
        raise ValueError(f"a box needs 4 numbers x1,y1,x2,y2; got {len(values)}")
    x1, y1, x2, y2 = (float(v) for v in values)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {x1:g},{y1:g},{x2:g},{y2:g} is inverted: need x1 <= x2 and y1 <= y2")
    return x1, y1, x2, y2


def iou(a: Box, b: Box) -> float:
    """True intersection over union of two boxes (0 for disjoint or empty boxes)."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def scale_box(box: Box, from_size: Size, to_size: Size) -> Box:
    """Map a box from an image of ``from_size`` to the same place in an image of ``to_size``."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def clip_box(box: Box, size: Size) -> Box:
    """Clip a box to the image ``size``."""
    w, h = size
    return (min(max(box[0], 0.0), w), min(max(box[1], 0.0), h), min(max(box[2], 0.0), w), min(max(box[3], 0.0), h))


def round_box(box: Box) -> tuple[int, int, int, int]:
    """Whole-pixel box."""
    return (round(box[0]), round(box[1]), round(box[2]), round(box[3]))


def normalized_center(box: Box, size: Size) -> tuple[float, float]:
    """Box centre as fractions of the image width and height."""
    return (box[0] + box[2]) / 2 / size[0], (box[1] + box[3]) / 2 / size[1]


def quadrant_of(box: Box, size: Size) -> str:
    """EndoVis quadrant name ("left-top", ...) of the box centre."""
    cx, cy = normalized_center(box, size)
    return f"{'left' if cx < 0.5 else 'right'}-{'top' if cy < 0.5 else 'bottom'}"
