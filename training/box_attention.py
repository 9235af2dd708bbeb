"""A training-only loss that teaches the language model where to look: at the question's box.

Measured on the built-in model (README, "What limits the rest"): an attentive probe with a learned query
per instrument reads each instrument's quadrant and state off the frozen stage 0 tower at 0.765 / 0.682 on
held-out frames (``reader_probe.py``), while the language model, trained by SFT alone, answers them at
0.539 / 0.346; the heads this loss supervises put 0.107 of their attention on the question's box (which
covers 0.189 of the frame) while they write the answer. The language model has to find the lookup itself
(the instrument named in the question -> that tool's image tokens), and next-token loss finds it slowly.

This loss supervises the lookup directly. On rows whose target has a box, at every position that predicts a
supervised completion token, the first head of each of the last ``ATTENDING_LAYERS`` layers is pushed to put
its attention on the image tokens whose 28x28-pixel cell centre lies inside the target box: the loss is
``-log(attention mass on those cells)``. Supervised are the answer and the box, and on chain-of-thought rows
also the sentences about the question's subject before them (``dataset.sft_row``'s ``attend_from``): with the
answer and box alone, the reasoning's state and position claims never got the lookup, and the answer follows
them (reasoning accuracy 0.11-0.12 below direct; README, "Where location gets lost"). Boxes are all it needs,
so it works on any Surgical-VQLA data (EndoVis boxes included), not only on the renderer's dense ground truth.

Attention weights are captured by forward hooks on those layers' ``self_attn`` modules; that needs the
"eager" attention implementation (SDPA does not return weights). The saved model is unchanged in kind: a
plain ``Qwen2_5_VLForConditionalGeneration``. No library has this (TRL's trainers only add router losses),
so it is written here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from surgery_r1_ros.boxes import Box, Size
from surgery_r1_ros.model.prompts import IGNORE_INDEX

from .vision_pretrain import CELL

ATTENDING_LAYERS = 2  # the first head of each of the language model's last two layers is supervised


def box_cells(box: Box | Sequence[float] | None, size: Size) -> np.ndarray:
    """Per image token (row-major cells of a ``size`` frame): whether its cell centre lies inside ``box``.

    All False without a box. ``box`` is in pixels of the model's input ``size``.
    """
    w, h = size
    gw, gh = w // CELL, h // CELL
    if box is None:
        return np.zeros(gw * gh, bool)
    x1, y1, x2, y2 = box
    cx = (np.arange(gw) + 0.5) * CELL
    cy = (np.arange(gh) + 0.5) * CELL
    inside = (cx[None, :] >= x1) & (cx[None, :] <= x2) & (cy[:, None] >= y1) & (cy[:, None] <= y2)
    if not inside.any():  # a box smaller than a cell: the cell under its centre
        col = min(int((x1 + x2) / 2 // CELL), gw - 1)
        row = min(int((y1 + y2) / 2 // CELL), gh - 1)
        inside[row, col] = True
    return inside.ravel()


def attending_layers(model) -> list[torch.nn.Module]:
    """The decoder layers whose attention's first head the loss supervises (a PEFT model: its base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.language_model.layers[-ATTENDING_LAYERS:])


@contextmanager
def captured_attention(model) -> Iterator[list[torch.Tensor]]:
    """Collect the attention weights (batch, heads, query, key) of the supervised layers during a forward."""
    weights: list[torch.Tensor] = []

    def keep(_module, _args, output) -> None:
        if output[1] is None:
            raise RuntimeError("box attention needs attention weights: load the model with attn_implementation='eager'")
        weights.append(output[1])

    handles = [layer.self_attn.register_forward_hook(keep) for layer in attending_layers(model)]
    try:
        yield weights
    finally:
        for handle in handles:
            handle.remove()


def box_attention_loss(
    weights: Sequence[torch.Tensor], input_ids: torch.Tensor, labels: torch.Tensor, cells: torch.Tensor,
    box_from: torch.Tensor, image_token_id: int,
) -> tuple[torch.Tensor, float] | None:  # fmt: skip
    """Mean ``-log`` attention mass on the box's cells, and that mass; None when no row has a box.

    ``cells`` is (batch, image tokens per row) bool, all False on rows that are not supervised; ``box_from``
    (batch,) the position of each row's first supervised target token (``SFTCollator``'s ``box_from``).
    """
    rows = cells.any(dim=-1)
    if not rows.any():
        return None
    image = input_ids == image_token_id
    if int(image.sum()) != cells.numel():
        raise ValueError(f"{int(image.sum())} image tokens in the batch but {cells.numel()} box cells")
    inside = torch.zeros(image.shape, dtype=weights[0].dtype, device=image.device)
    inside[image] = cells.flatten().to(inside.dtype)
    predicts = torch.zeros_like(image)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # the position before each target token predicts it
    predicts &= torch.arange(1, image.shape[1] + 1, device=image.device)[None, :] >= box_from[:, None]
    chosen = predicts & rows[:, None]
    masses = [(w[:, 0] * inside[:, None, :]).sum(dim=-1)[chosen] for w in weights]  # first head, per position
    row_of = chosen.nonzero()[:, 0].repeat(len(weights))
    return attention_loss(torch.cat(masses), row_of)


def attention_loss(mass: torch.Tensor, row_of: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The box attention loss of per-position attention masses on the box, and their mean: ``-log`` mass averaged
    per row, then over rows, so a chain of thought's ~70 supervised positions weigh as much as a grounding row's
    ~20 (``row_of``: each position's row)."""
    per_position = -(mass + 1e-6).log()
    rows, row_index = row_of.unique(return_inverse=True)
    sums = torch.zeros(len(rows), dtype=per_position.dtype, device=mass.device).index_add(0, row_index, per_position)
    counts = torch.bincount(row_index, minlength=len(rows)).to(per_position.dtype)
    return (sums / counts).mean(), float(mass.detach().mean())


@torch.inference_mode()
def attention_on_boxes(loaded, rows: list[dict], batch_size: int = 16) -> float:
    """Mean attention mass the supervised heads put on the box's cells, over ``sft_row`` rows with a box.

    ``loaded`` must come from ``load_model(..., attn_implementation="eager")``. The share of the frame the
    boxes cover is what a head that ignores the question would score (times its mass on the image).
    """
    from .dataset import ImageCache, SFTCollator

    collator = SFTCollator(loaded.processor, ImageCache(), box_cells=True)
    rows = [r for r in rows if r["attend_box"] is not None]
    if not rows:
        raise ValueError("no rows with a box to measure attention on")
    model = loaded.model
    total = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collator(chunk)
        cells, box_from = batch.pop("box_cells"), batch.pop("box_from")
        labels = batch.pop("labels")
        with captured_attention(model) as weights:
            model(**batch)
        _, mass = box_attention_loss(weights, batch["input_ids"], labels, cells, box_from, model.config.image_token_id)
        total += mass * len(chunk)
    return total / len(rows)
