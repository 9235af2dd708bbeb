"""Training rows from the Surgery-R1 mix, for SFT (teacher forcing) and GRPO (prompts + reward columns).

A mix record (``surgery_r1_ros.data.mix``) has its box in pixels of the original frame; the model sees the
frame resized to its fixed input size, so targets and reward columns carry the box scaled to that size
(``model_size``). Targets are written by ``protocol.build_target`` and the prompt mode by
``protocol.target_mode``: the same functions the runtime parses with.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from surgery_r1_ros import protocol
from surgery_r1_ros.boxes import Size, scale_box
from surgery_r1_ros.data.mix import subject_sentences_start
from surgery_r1_ros.model.prompts import IGNORE_INDEX

from .augment import augment
from .config import DataConfig


class ImageCache:
    """Frames loaded as RGB, kept in memory (LRU). The processor resizes them, as at runtime."""

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self._images: OrderedDict[str, Image.Image] = OrderedDict()

    def __call__(self, path: str) -> Image.Image:
        image = self._images.get(path)
        if image is not None:
            self._images.move_to_end(path)
            return image
        with Image.open(path) as raw:
            image = raw.convert("RGB")
        self._images[path] = image
        if len(self._images) > self.capacity:
            self._images.popitem(last=False)
        return image


def load_records(data: DataConfig) -> list[dict]:
    """Mix records of the configured kinds, shuffled with the config's seed and cut to ``limit`` questions."""
    from surgery_r1_ros.data.mix import build_mix, read_mix

    if data.mix:
        records = read_mix(data.mix)
    else:
        from surgery_r1_ros.data.vqla import load_vqla

        records = build_mix(load_vqla(data.dataset, data.split), seed=data.seed)
    if not records:
        raise ValueError(f"no training records in {data.mix or data.dataset}")
    # Group the records of one question (one per kind) so that `limit` counts questions, not records.
    questions: dict[tuple, list[dict]] = {}
    for record in records:
        questions.setdefault((record["image"], record["question"]), []).append(record)
    keys = list(questions)
    random.Random(data.seed).shuffle(keys)
    if data.limit:
        keys = keys[: data.limit]
    kinds = set(data.kinds)
    chosen = [r for key in keys for r in questions[key] if r["kind"] in kinds]
    random.Random(data.seed + 1).shuffle(chosen)
    if not chosen:
        raise ValueError(f"no records of kinds {sorted(kinds)} in {data.mix or data.dataset}")
    return chosen


def model_box(record: dict, model_size: Size) -> list[float] | None:
    """The record's box scaled from the original frame to the model's input pixels."""
    if record.get("box") is None:
        return None
    w, h = record["image_size"]
    return list(scale_box(tuple(record["box"]), (int(w), int(h)), model_size))


def sft_row(record: dict, model_size: Size) -> dict[str, Any]:
    """A teacher-forcing row: image path, question, prompt mode and target completion, and where box attention
    (box_attention.py) looks, ``attend_box``, from which character of the target on, ``attend_from``: the whole
    completion without reasoning; with reasoning, from the sentences about the question's subject (the answer
    and box only on organ questions), since the reasoning before them is about other things."""
    box = model_box(record, model_size)
    reasoning = record.get("reasoning")
    target = protocol.build_target(record["answer"], tuple(box) if box else None, reasoning)
    attend_from = 0
    if reasoning is not None:
        thought = reasoning.strip()
        attend_from = target.index(thought) + subject_sentences_start(thought, record.get("subject"))
    return {
        "image_path": record["image"],
        "question": record["question"],
        "mode": str(protocol.target_mode(reasoning, box)),
        "target": target,
        "kind": record["kind"],
        "attend_box": box,
        "attend_from": attend_from,
    }


class SFTCollator:
    """Batches SFT rows through the model helper's ``encode_prompt``: loss on the completion only."""

    def __init__(
        self,
        processor,
        images: ImageCache,
        shuffle_images: bool = False,
        seed: int = 0,
        augment: bool = False,
        box_cells: bool = False,
    ) -> None:
        self.processor = processor
        self.box_cells = box_cells  # add each row's ``box_cells`` (the box attention loss's targets)
        self.images = images
        # Diagnostic: pair each question with another row's image; the loss must then go up.
        self.shuffle_images = shuffle_images
        self._rng = random.Random(seed)
        self._augment_rng = np.random.default_rng(seed) if augment else None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from surgery_r1_ros.model import encode_prompt

        images = [self.images(r["image_path"]) for r in rows]
        if self._augment_rng is not None:
            images = [Image.fromarray(augment(np.asarray(im), self._augment_rng)) for im in images]
        if self.shuffle_images and len(images) > 1:
            order = list(range(len(images)))
            self._rng.shuffle(order)
            images = [images[i] for i in order]
        batch = encode_prompt(
            self.processor,
            images,
            [r["question"] for r in rows],
            [protocol.PromptMode(r["mode"]) for r in rows],
            targets=[r["target"] for r in rows],
        )
        if self.box_cells:
            from surgery_r1_ros.model import image_size

            from .box_attention import box_cells

            size = image_size(self.processor)
            cells = [box_cells(r["attend_box"], size) for r in rows]
            batch["box_cells"] = torch.from_numpy(np.stack(cells))
            batch["box_from"] = self._box_from(rows, batch["labels"])
        return dict(batch)

    def _box_from(self, rows: list[dict], labels: torch.Tensor) -> torch.Tensor:
        """Per row, the position of its first target token that box attention supervises: the first completion
        token plus the tokens of the target before ``attend_from``. Counting them by tokenizing that prefix alone
        is exact: it ends at a sentence's full stop or at a tag, where the pre-tokenizer splits anyway."""
        tokenizer = self.processor.tokenizer
        starts = (labels != IGNORE_INDEX).int().argmax(dim=1)
        prefixes = [r["target"][: r["attend_from"]] for r in rows]
        skipped = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0 for text in prefixes]
        return starts + torch.tensor(skipped, dtype=starts.dtype)


def sft_dataset(records: list[dict], model_size: Size):
    """A ``datasets.Dataset`` of SFT rows (the collator loads the frames)."""
    from datasets import Dataset

    return Dataset.from_list([sft_row(r, model_size) for r in records])


def rft_row(record: dict, model_size: Size) -> dict[str, Any]:
    """A GRPO row: the chat prompt (image placeholder first) and the columns the rewards read."""
    box = model_box(record, model_size)
    mode = protocol.target_mode(record.get("reasoning"), box)
    return {
        "prompt": protocol.build_messages(record["question"], mode),
        "image_path": record["image"],
        "mode": str(mode),
        "answer": record["answer"],
        "target_box": box,
        "model_size": list(model_size),
        "subject": record.get("subject"),
    }


def rft_dataset(records: list[dict], model_size: Size):
    """A ``datasets.Dataset`` of GRPO rows; its ``image`` column decodes the frame file on access."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    rows = [{**rft_row(r, model_size), "image": r["image"]} for r in records]
    return Dataset.from_list(rows).cast_column("image", ImageFeature(mode="RGB"))


def dataset_colour_stats(image_paths: list[str], size: Size, limit: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1) of the frames at the model's input size: the model's normalisation.

    The standard CLIP statistics make flat pink tissue map to nearly identical image tokens; the data's
    own statistics keep them distinct (see the model card).
    """
    import numpy as np

    paths = sorted(set(image_paths))
    step = max(1, len(paths) // limit)
    arrays = []
    for p in paths[::step][:limit]:
        with Image.open(p) as raw:
            arrays.append(np.asarray(raw.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float64).reshape(-1, 3))
    pixels = np.concatenate(arrays) / 255.0
    mean = pixels.mean(axis=0)
    std = pixels.std(axis=0).clip(min=1e-3)
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def frames_of(records: list[dict]) -> list[str]:
    return sorted({r["image"] for r in records})


def resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()
