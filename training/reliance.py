"""Does the model look at the image? Teacher-forced loss with each question's own frame vs another's.

A model that reads the frame does worse when its questions are paired with the wrong frames; one that has
only learnt the text prior (label and box frequencies) scores the same either way. The gap
``loss_shuffled - loss_true`` is reported in the built-in model's card beside the ablation, because
accuracy alone cannot tell "looks, but wrongly" from "does not look".
"""

from __future__ import annotations

import random
from pathlib import Path

from .dataset import ImageCache, SFTCollator, sft_dataset


def teacher_forced_loss(loaded, rows: list[dict], shuffle_images: bool, batch_size: int = 16, seed: int = 0) -> float:
    """Mean loss on the completions of ``rows`` (SFT rows), with frames optionally shuffled within each batch."""
    import torch

    collator = SFTCollator(loaded.processor, ImageCache(), shuffle_images=shuffle_images, seed=seed)
    losses = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = collator(rows[start : start + batch_size])
            batch = {k: v.to(loaded.device) for k, v in batch.items()}
            losses.append(float(loaded.model(**batch).loss))
    return sum(losses) / len(losses)


def image_reliance(model: str | Path, records: list[dict], limit: int = 128, seed: int = 0) -> dict:
    """Loss with true and with shuffled frames on the first ``limit`` grounding records, and their gap."""
    from surgery_r1_ros.model import image_size, load_model

    loaded = load_model(model)
    chosen = [r for r in records if r["kind"] == "grounding"]
    random.Random(seed).shuffle(chosen)  # batches of many frames, so that shuffling really swaps them
    chosen = chosen[:limit]
    if len({r["image"] for r in chosen}) < 2:
        raise ValueError("image reliance needs questions about at least two different frames")
    rows = [dict(row) for row in sft_dataset(chosen, image_size(loaded.processor))]
    true_loss = teacher_forced_loss(loaded, rows, shuffle_images=False, seed=seed)
    shuffled = teacher_forced_loss(loaded, rows, shuffle_images=True, seed=seed)
    return {"n": len(rows), "loss_true": true_loss, "loss_shuffled": shuffled, "gap": shuffled - true_loss}


class RelianceError(RuntimeError):
    """A trained model whose answers no longer depend on the frame."""


def require_reliance(model: str | Path, records: list[dict], min_gap: float, stage: str, limit: int = 128) -> dict:
    """The reliance gate of a training stage: measure it and fail loudly if the gap is below ``min_gap``."""
    result = image_reliance(model, records, limit=limit)
    if result["gap"] < min_gap:
        raise RelianceError(
            f"stage {stage}: the model barely uses the image (test loss {result['loss_true']:.4f} with its own "
            f"frames, {result['loss_shuffled']:.4f} with shuffled frames: gap {result['gap']:+.4f} < {min_gap}). "
            "Its answers come from the text prior. Check the vision pre-training's held-out scores, keep the vision "
            "tower frozen or at a lower learning rate, or lower the learning rate of this stage."
        )
    return result
