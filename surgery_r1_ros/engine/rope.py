"""Qwen2.5-VL's 3-row M-RoPE position ids for an image-first prompt, without the model.

Text tokens get the same position on all three rows (temporal, height, width), counting up by one.
An image's merged tokens get ``start + (t, row, col)``; the text after it continues from
``start + max(grid_h, grid_w) // merge``, i.e. one past the largest image position. This mirrors
``Qwen2_5_VLModel.get_rope_index`` for one still image, so every backend (torch, ONNX Runtime,
TensorRT) can build the same positions for the frame prefix and for the question that follows it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def prefix_positions(
    prefix_ids: Sequence[int], image_token_id: int, grid_thw: Sequence[int], merge_size: int = 2
) -> tuple[np.ndarray, int]:
    """Positions (3, len(prefix_ids)) of a prompt prefix holding one image, and the next text position.

    ``grid_thw`` is the image's patch grid (t, h, w) before merging, as the processor returns it.
    """
    ids = np.asarray(prefix_ids)
    is_image = ids == image_token_id
    t, h, w = (int(v) for v in grid_thw)
    gh, gw = h // merge_size, w // merge_size
    n_image = t * gh * gw
    image_at = np.flatnonzero(is_image)
    if len(image_at) != n_image or (n_image and image_at[-1] - image_at[0] + 1 != n_image):
        raise ValueError(f"prefix must hold one contiguous run of {n_image} image tokens; found {len(image_at)}")
    positions = np.zeros((3, len(ids)), dtype=np.int64)
    start = int(image_at[0]) if n_image else len(ids)
    positions[:, :start] = np.arange(start)
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    positions[:, start : start + n_image] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start
    after = start + max(gh, gw) if n_image else start
    n_tail = len(ids) - start - n_image
    positions[:, start + n_image :] = np.arange(after, after + n_tail)
    return positions, after + n_tail


def text_positions(start: int, length: int) -> np.ndarray:
    """Positions (3, length) of text tokens that follow at ``start`` (same value on every row)."""
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (3, length)).copy()
