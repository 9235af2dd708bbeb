"""Drawing helpers: sub-pixel anti-aliased cv2 primitives in an instrument's local frame.

An instrument is drawn in local coordinates: ``x`` runs from the tip (x=0) back along the shaft,
``y`` across it. :class:`Pen` records shapes on named layers (tissue cues, the instrument body,
objects held over it, smoke) so the scene can draw every instrument's tissue cues first, then
shadows, then the instruments, then smoke, and it keeps the instrument's own polygons for its box.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

AA = cv2.LINE_AA
SHIFT = 4  # fixed-point bits for sub-pixel drawing
_ONE = float(1 << SHIFT)

LAYERS = ("tissue", "body", "over", "smoke")

Color = tuple[int, int, int]


def to_fixed(pts: np.ndarray) -> np.ndarray:
    """Float (N, 2) pixel points as the int32 fixed-point array cv2 wants with ``shift=SHIFT``."""
    return np.round(np.asarray(pts, np.float64) * _ONE).astype(np.int32)


def ellipse_points(cx: float, cy: float, a: float, b: float, start: float = 0.0, end: float = 360.0, n: int = 32):
    """Points of an axis-aligned ellipse arc (degrees) in whatever frame cx, cy are given."""
    t = np.radians(np.linspace(start, end, n, endpoint=(end - start) < 360))
    return np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], axis=1)


def rounded_rect(x0: float, x1: float, y0: float, y1: float, r: float, n: int = 6) -> np.ndarray:
    """A rectangle with rounded corners (radius r), as a polygon."""
    r = max(0.0, min(r, (x1 - x0) / 2, (y1 - y0) / 2))
    corners = ((x1 - r, y1 - r, 0), (x0 + r, y1 - r, 90), (x0 + r, y0 + r, 180), (x1 - r, y0 + r, 270))
    pts = []
    for cx, cy, a0 in corners:
        t = np.radians(np.linspace(a0, a0 + 90, n))
        pts.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1))
    return np.concatenate(pts)


def bezier(p0, p1, p2, n: int = 24) -> np.ndarray:
    """Quadratic Bezier curve points."""
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def rotate(pts: np.ndarray, angle: float, pivot=(0.0, 0.0)) -> np.ndarray:
    """Rotate local points by ``angle`` radians about ``pivot``."""
    c, s = np.cos(angle), np.sin(angle)
    p = np.asarray(pts, np.float64) - pivot
    return np.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]], axis=1) + pivot


def blend_fill(img: np.ndarray, contours: Sequence[np.ndarray], color: Color, alpha: float) -> None:
    """Fill pixel polygons with ``color`` at opacity ``alpha`` (work limited to their bounding box)."""
    h, w = img.shape[:2]
    allpts = np.concatenate(contours)
    x1, y1 = np.floor(allpts.min(axis=0)).astype(int) - 2
    x2, y2 = np.ceil(allpts.max(axis=0)).astype(int) + 2
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if x2 <= x1 or y2 <= y1:
        return
    roi = img[y1:y2, x1:x2]
    layer = roi.copy()
    cv2.fillPoly(layer, [to_fixed(c - (x1, y1)) for c in contours], color, AA, SHIFT)
    cv2.addWeighted(layer, alpha, roi, 1 - alpha, 0, dst=roi)


def soft_blobs(img: np.ndarray, blobs: Sequence[tuple[float, float, float, float]], color: Color, blur: float) -> None:
    """Blend soft round blobs ``(x, y, radius, opacity)`` of ``color`` into ``img`` (smoke, haze).

    The mask is drawn at quarter resolution over the blobs' bounding box only, blurred and
    upsampled; the blend is done in uint8.
    """
    if not blobs:
        return
    h, w = img.shape[:2]
    arr = np.asarray(blobs, np.float64)
    pad = arr[:, 2].max() + 2 * blur + 2
    x1, y1 = int(max(0, arr[:, 0].min() - pad)), int(max(0, arr[:, 1].min() - pad))
    x2, y2 = int(min(w, arr[:, 0].max() + pad)), int(min(h, arr[:, 1].max() + pad))
    if x2 - x1 < 4 or y2 - y1 < 4:
        return
    q = 4
    rw, rh = max(2, (x2 - x1) // q), max(2, (y2 - y1) // q)
    sx, sy = rw / (x2 - x1), rh / (y2 - y1)
    mask = np.zeros((rh, rw), np.uint8)
    for x, y, r, a in arr:
        center = (int(np.rint((x - x1) * sx * _ONE)), int(np.rint((y - y1) * sy * _ONE)))
        cv2.circle(mask, center, max(1, int(np.rint(r * sx * _ONE))), int(255 * min(1.0, a)), -1, AA, SHIFT)
    mask = cv2.GaussianBlur(mask, (0, 0), max(0.5, blur * sx))
    mask = cv2.resize(mask, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    alpha = cv2.merge([mask, mask, mask])
    roi = img[y1:y2, x1:x2]
    keep = cv2.multiply(roi, cv2.bitwise_not(alpha), scale=1 / 255.0)
    paint = cv2.multiply(alpha, (*(float(c) for c in color), 0.0), scale=1 / 255.0)
    cv2.add(keep, paint, dst=roi)


class Pen:
    """Records shapes given in an instrument's local frame, per layer, as pixel-space draw ops."""

    def __init__(self, tip: Sequence[float], angle: float) -> None:
        self.origin = np.asarray(tip, np.float64)
        self.u = np.array([np.cos(angle), np.sin(angle)])  # from the tip back along the shaft
        self.v = np.array([-np.sin(angle), np.cos(angle)])  # across the shaft
        self.ops: dict[str, list[tuple]] = {layer: [] for layer in LAYERS}
        self.body: list[np.ndarray] = []  # pixel polygons of the instrument itself (for its box)
        self.silhouette: list[np.ndarray] = []  # pixel polygons that cast the shadow

    def px(self, pts) -> np.ndarray:
        """Local points (N, 2) to pixel points."""
        p = np.asarray(pts, np.float64).reshape(-1, 2)
        return self.origin + p[:, :1] * self.u + p[:, 1:2] * self.v

    def poly(self, layer: str, pts, color: Color, body: bool = False, alpha: float = 1.0) -> None:
        """A filled polygon (local points). ``body`` marks it as part of the instrument."""
        p = self.px(pts)
        if body:
            self.body.append(p)
            self.silhouette.append(p)
        self.ops[layer].append(("fill", [p], color, alpha))

    def poly_holes(self, layer: str, contours, color: Color, body: bool = False) -> None:
        """A filled polygon with holes (even-odd fill of several local contours)."""
        ps = [self.px(c) for c in contours]
        if body:
            self.body.append(ps[0])
            self.silhouette.append(ps[0])
        self.ops[layer].append(("fill", ps, color, 1.0))

    def line(self, layer: str, pts, color: Color, thickness: float, closed: bool = False) -> None:
        """A polyline (local points) ``thickness`` pixels wide."""
        self.ops[layer].append(("line", self.px(pts), color, max(1, round(thickness)), closed))

    def circle(self, layer: str, center, radius: float, color: Color, alpha: float = 1.0) -> None:
        c = np.asarray(center, np.float64)
        self.poly(layer, ellipse_points(c[0], c[1], radius, radius, n=28), color, alpha=alpha)

    def blobs(self, layer: str, blobs: Sequence[tuple[float, float, float, float]], color: Color, blur: float):
        """Soft blobs (local x, y, radius, opacity), e.g. smoke."""
        pts = self.px([(b[0], b[1]) for b in blobs]) if blobs else np.zeros((0, 2))
        self.ops[layer].append(
            ("blobs", [(p[0], p[1], b[2], b[3]) for p, b in zip(pts, blobs, strict=True)], color, blur)
        )

    def render(self, img: np.ndarray, layer: str) -> None:
        """Draw the ops of ``layer`` onto ``img`` (RGB uint8) in recording order."""
        for op in self.ops[layer]:
            kind = op[0]
            if kind == "fill":
                _, contours, color, alpha = op
                if alpha >= 1.0:
                    cv2.fillPoly(img, [to_fixed(c) for c in contours], color, AA, SHIFT)
                else:
                    blend_fill(img, contours, color, alpha)
            elif kind == "line":
                _, pts, color, thickness, closed = op
                cv2.polylines(img, [to_fixed(pts)], closed, color, thickness, AA, SHIFT)
            elif kind == "blobs":
                _, blobs, color, blur = op
                soft_blobs(img, blobs, color, blur)
