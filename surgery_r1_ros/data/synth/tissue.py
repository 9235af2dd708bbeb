"""The endoscope background: a tissue texture with vessels, fat, wet highlights and a kidney.

One texture is made per sequence, a little larger than the frame so the camera can drift over it;
each frame is a crop of it (no per-frame texture work). The smooth parts (colour, fat, creases, the
kidney's shading) are computed at quarter resolution and upsampled; the fine parts (mottling,
vessels, the kidney's rim, highlights) are drawn at full resolution with cv2.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from surgery_r1_ros.data.synth.draw import AA, SHIFT, to_fixed

# RGB colours
TISSUE_PINK = np.array([214, 112, 100], np.float32)
TISSUE_RED = np.array([162, 52, 52], np.float32)
FAT_YELLOW = np.array([226, 184, 110], np.float32)
KIDNEY = np.array([126, 24, 30], np.float32)
LOW_RES = 4  # smooth layers are computed at 1/LOW_RES of the full resolution


@dataclass
class Background:
    """A sequence's tissue texture (RGB, larger than the frame by ``margin`` on each side) and organ."""

    texture: np.ndarray
    margin: int
    size: tuple[int, int]
    organ: str
    organ_polygon: np.ndarray  # (N, 2) float, texture coordinates

    def crop(self, offset: tuple[int, int]) -> np.ndarray:
        """A copy of the frame-sized view at camera ``offset`` (0..2*margin each)."""
        w, h = self.size
        ox, oy = offset
        return self.texture[oy : oy + h, ox : ox + w].copy()

    def organ_box(self, offset: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """The organ's box in frame pixels, clipped to the frame; None when it is out of view."""
        w, h = self.size
        pts = self.organ_polygon - np.asarray(offset, np.float32)
        x1, y1 = pts.min(axis=0)
        x2, y2 = pts.max(axis=0)
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
        if x2 - x1 < 4 or y2 - y1 < 4:
            return None
        return float(x1), float(y1), float(x2), float(y2)


def _field(rng: np.random.Generator, shape: tuple[int, int], octaves: tuple[int, ...], falloff: float = 0.55):
    """Smooth random field in [0, 1]: octaves of random grids resized with cubic interpolation."""
    h, w = shape
    total = np.zeros((h, w), np.float32)
    amp, norm = 1.0, 0.0
    for cells in octaves:
        gw = max(2, cells)
        gh = max(2, round(cells * h / w))
        grid = rng.random((gh, gw), dtype=np.float32)
        total += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        norm += amp
        amp *= falloff
    total /= norm
    lo, hi = float(total.min()), float(total.max())
    return (total - lo) / max(hi - lo, 1e-6)


def _smoothstep(x: np.ndarray, a: float, b: float) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _random_walk(rng: np.random.Generator, start, angle: float, steps: int, step: float, wiggle: float) -> np.ndarray:
    pts = [np.asarray(start, np.float64)]
    for _ in range(steps):
        angle += rng.normal(0.0, wiggle)
        pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    return np.array(pts)


def bean_polygon(center, length: float, width: float, angle: float, dent: float = 0.3, n: int = 90) -> np.ndarray:
    """A kidney-bean outline: an ellipse with a dent (the hilum) on one long side."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 0.5 * length * np.cos(t) * (1 + 0.06 * np.cos(2 * t))
    y = 0.5 * width * np.sin(t) + dent * width * np.exp(-(((t - 1.5 * np.pi) / 0.5) ** 2))
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([center[0] + c * x - s * y, center[1] + s * x + c * y], axis=1).astype(np.float32)


def _low_res_layers(rng, shape, polygon, length, center, q):
    """Tissue colour, fat, creases and the shaded kidney at 1/q resolution (float RGB)."""
    lh, lw = shape
    f_red = _field(rng, shape, (3, 7, 15, 31))
    f_fat = _field(rng, shape, (3, 6, 12))
    f_mid = _field(rng, shape, (50, 100), falloff=0.8)
    hue = rng.uniform(-12, 12, 3).astype(np.float32)
    mix = _smoothstep(f_red, 0.25, 0.85)[..., None]
    tex = (TISSUE_PINK + hue) * (1 - mix) + (TISSUE_RED + 0.5 * hue) * mix
    fat_amount = rng.uniform(0.12, 0.42)
    fat = _smoothstep(f_fat, 1.0 - fat_amount, 1.0 - fat_amount + 0.16)[..., None] * 0.85
    tex = tex * (1 - fat) + (FAT_YELLOW * (0.94 + 0.12 * f_mid[..., None])) * fat
    tex *= (0.9 + 0.2 * f_mid)[..., None]

    # large vessels under the surface: drawn at low resolution so they come out soft
    vessels = np.zeros(shape, np.float32)
    for _ in range(rng.integers(4, 8)):
        pts = _random_walk(
            rng,
            (rng.uniform(0, lw), rng.uniform(0, lh)),
            rng.uniform(0, 2 * np.pi),
            int(rng.integers(15, 35)),
            lw / 60,
            0.22,
        )
        cv2.polylines(
            vessels, [to_fixed(pts)], False, float(rng.uniform(0.5, 0.85)), max(1, round(lw / 250)), AA, SHIFT
        )
        for _ in range(rng.integers(1, 4)):
            k = int(rng.integers(1, len(pts) - 1))
            branch = _random_walk(rng, pts[k], rng.uniform(0, 2 * np.pi), int(rng.integers(6, 14)), lw / 90, 0.3)
            cv2.polylines(vessels, [to_fixed(branch)], False, 0.5, 1, AA, SHIFT)
    vessels = cv2.GaussianBlur(vessels, (0, 0), 0.7)[..., None]
    tex = tex * (1 - vessels) + np.array([108, 22, 40], np.float32) * vessels

    crease = np.zeros(shape, np.float32)
    for _ in range(rng.integers(3, 6)):
        pts = _random_walk(rng, (rng.uniform(0, lw), rng.uniform(0, lh)), rng.uniform(0, 2 * np.pi), 24, lw / 32, 0.25)
        cv2.polylines(crease, [to_fixed(pts)], False, 1.0, max(1, lw // 120), AA, SHIFT)
    crease = cv2.GaussianBlur(crease, (0, 0), max(1.0, lw / 150))
    tex *= (1 - 0.4 * np.clip(crease, 0, 1))[..., None]

    # the kidney: shaded by depth inside its outline, with a soft shadow around it
    poly = polygon / q
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [to_fixed(poly)], 255, AA, SHIFT)
    kmask = mask.astype(np.float32) / 255.0
    ring = cv2.GaussianBlur(kmask, (0, 0), max(1.0, lw / 100))
    tex *= (1 - 0.5 * np.clip(ring * 2.0, 0, 1) * (1 - kmask))[..., None]
    depth = cv2.distanceTransform((mask > 127).astype(np.uint8), cv2.DIST_L2, 5)
    depth = np.sqrt(np.clip(depth / (0.2 * length / q), 0, 1))
    a = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    grad = ((xx - center[0] / q) * np.cos(a) + (yy - center[1] / q) * np.sin(a)) / (length / q)
    shade = (0.45 + 0.6 * depth) * (1.0 - 0.4 * grad) * (0.94 + 0.12 * f_mid)
    kidney = (KIDNEY + rng.uniform(-10, 10, 3).astype(np.float32)) * shade[..., None]
    km = kmask[..., None]
    return tex * (1 - km) + kidney * km


def make_background(rng: np.random.Generator, size: tuple[int, int], unit: float, difficulty: str) -> Background:
    """Render a sequence's tissue texture with a kidney. ``unit`` is the pixel scale (1.0 at 1280x1024)."""
    w, h = size
    margin = max(4, round(0.05 * w))
    tw, th = w + 2 * margin, h + 2 * margin
    q = LOW_RES
    lw, lh = max(8, tw // q), max(8, th // q)

    length = rng.uniform(0.4, 0.56) * w
    center = (margin + rng.uniform(0.3, 0.7) * w, margin + rng.uniform(0.32, 0.68) * h)
    polygon = bean_polygon(center, length, length * rng.uniform(0.52, 0.62), rng.uniform(0, 2 * np.pi))
    low = _low_res_layers(
        rng,
        (lh, lw),
        polygon * (lw * q / tw, lh * q / th),
        length * lw * q / tw,
        (center[0] * lw * q / tw, center[1] * lh * q / th),
        q,
    )
    tex = cv2.resize(np.clip(low, 0, 255).astype(np.uint8), (tw, th), interpolation=cv2.INTER_CUBIC)

    # fine mottling at full resolution
    grain = rng.integers(100, 156, (th // 2 + 1, tw // 2 + 1), dtype=np.uint8)
    grain = cv2.resize(cv2.GaussianBlur(grain, (0, 0), 0.8), (tw, th), interpolation=cv2.INTER_LINEAR)
    cv2.multiply(tex, cv2.merge([grain, grain, grain]), dst=tex, scale=1 / 128)

    # fine capillaries: thin, low-contrast
    for _ in range(rng.integers(4, 9)):
        color = tuple(int(c) for c in rng.uniform([120, 30, 40], [150, 50, 60]))
        pts = _random_walk(
            rng,
            (rng.uniform(0, tw), rng.uniform(0, th)),
            rng.uniform(0, 2 * np.pi),
            int(rng.integers(8, 20)),
            14 * unit,
            0.35,
        )
        cv2.polylines(tex, [to_fixed(pts)], False, color, max(1, round(1.6 * unit)), AA, SHIFT)
    # the kidney: capsule vessels and a crisp rim
    for _ in range(rng.integers(3, 7)):
        start = polygon[rng.integers(len(polygon))]
        pts = _random_walk(rng, start, rng.uniform(0, 2 * np.pi), 10, 18 * unit, 0.35)
        cv2.polylines(tex, [to_fixed(pts)], False, (90, 14, 24), max(1, round(2.5 * unit)), AA, SHIFT)
    cv2.polylines(tex, [to_fixed(polygon)], True, (70, 12, 18), max(1, round(2.5 * unit)), AA, SHIFT)

    # wet highlights: a few soft glints with saturated cores, more on the glossy kidney
    spec = np.zeros((th, tw), np.uint8)
    n_glints = {"easy": 10, "normal": 14, "hard": 20}.get(difficulty, 14)
    k_center = polygon.mean(axis=0)
    for k in range(n_glints + 6):
        on_kidney = k >= n_glints
        p = k_center + rng.normal(0, 0.15 * length, 2) if on_kidney else rng.uniform([0, 0], [tw, th])
        size = rng.uniform(6, 22) * unit * (1.4 if on_kidney else 1.0)
        axes = (max(1, int(size)), max(1, int(size * rng.uniform(0.2, 0.5))))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(spec, (int(p[0]), int(p[1])), axes, angle, 0, 360, 120, -1, AA)
        core = (max(1, axes[0] // 2), max(1, axes[1] // 2))
        cv2.ellipse(spec, (int(p[0]), int(p[1])), core, angle, 0, 360, 255, -1, AA)
        for _ in range(rng.integers(0, 4)):  # a few droplets around it
            d = p + rng.normal(0, 2.5 * size, 2)
            r = max(1, int(rng.uniform(1.5, 4) * unit))
            cv2.circle(spec, (int(d[0]), int(d[1])), r, 200, -1, AA)
    spec = cv2.GaussianBlur(spec, (0, 0), 2.2 * unit + 0.3)
    cv2.add(tex, cv2.merge([spec, spec, spec]), dst=tex)
    return Background(tex, margin, (w, h), "kidney", polygon)
