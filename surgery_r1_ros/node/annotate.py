"""Draw an answer and its box on the answered frame (the ~/annotated_image output)."""

from __future__ import annotations

import cv2
import numpy as np

BOX_COLOUR = (0, 255, 0)  # RGB
TEXT_COLOUR = (255, 255, 255)
SHADOW_COLOUR = (0, 0, 0)


def draw_answer(
    rgb: np.ndarray,
    question: str,
    answer: str,
    box: tuple[int, int, int, int] | None,
    coherent: bool = True,
) -> np.ndarray:
    """A copy of ``rgb`` with the box (x1, y1, x2, y2 pixels) and the question and answer written on it."""
    out = np.array(rgb, dtype=np.uint8, copy=True, order="C")
    height, width = out.shape[:2]
    scale = max(0.5, min(width, height) / 900)
    thickness = max(1, round(2 * scale))
    if box is not None:
        x1, y1, x2, y2 = (int(v) for v in box)
        colour = BOX_COLOUR if coherent else (255, 160, 0)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness + 1)
        _text(out, answer, (x1 + 4, max(y1 - 8, int(24 * scale))), scale, thickness)
    lines = [f"Q: {question}", f"A: {answer}" + ("" if coherent else "  (reasoning disagrees with box)")]
    for i, line in enumerate(lines):
        _text(out, line, (int(10 * scale), int((30 + 30 * i) * scale)), scale, thickness)
    return out


def _text(img: np.ndarray, text: str, origin: tuple[int, int], scale: float, thickness: int) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, text, origin, font, scale, SHADOW_COLOUR, thickness + 2, cv2.LINE_AA)
    cv2.putText(img, text, origin, font, scale, TEXT_COLOUR, thickness, cv2.LINE_AA)
