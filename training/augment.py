"""Photometric frame perturbations: random augmentation for training, one fixed degradation for evaluation.

Only colour, blur, noise and compression change: geometry stays, so boxes, quadrants and the dense ground
truth stay valid without being transformed. ``degrade`` is the robustness check of the model card (JPEG
quality 45, 20% darker, sensor noise): a model that reads the frame should lose little on it.
"""

from __future__ import annotations

import cv2
import numpy as np

DEGRADE_JPEG_QUALITY = 45
DEGRADE_GAIN = 0.8
DEGRADE_NOISE_SIGMA = 6.0


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - cv2 encodes any uint8 RGB array
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float32) + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random photometric variant of an RGB uint8 frame (brightness, contrast, colour, blur, noise, JPEG)."""
    x = image.astype(np.float32)
    mean = x.mean(axis=(0, 1), keepdims=True)
    contrast = rng.uniform(0.8, 1.2)
    colour = rng.uniform(0.9, 1.1, size=(1, 1, 3)).astype(np.float32)
    x = ((x - mean) * contrast + mean) * colour * rng.uniform(0.7, 1.2)
    out = np.clip(x, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.6:
        out = _noise(out, float(rng.uniform(1.0, 8.0)), rng)
    if rng.random() < 0.4:
        out = _jpeg(out, int(rng.integers(30, 91)))
    return out


def degrade(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """The fixed degradation of the robustness check: 20% darker, sensor noise, then JPEG quality 45."""
    darker = np.clip(image.astype(np.float32) * DEGRADE_GAIN, 0, 255).astype(np.uint8)
    noisy = _noise(darker, DEGRADE_NOISE_SIGMA, np.random.default_rng(seed))
    return _jpeg(noisy, DEGRADE_JPEG_QUALITY)
