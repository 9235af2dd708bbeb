"""Evaluation on a VQLA-format split: accuracy, F-score, legacy and true mIoU, coherence and format rates.

    surgery-r1 eval [--model DIR] --data DIR --split test --out DIR [--reasoning]

The model (default: the built-in one) answers every question of the split with batched greedy decoding.
Each completion is read by ``grounding.ground`` (parse, clip, scale to the frame, coherence), the same
function the runtime uses, and the answers are scored by ``scoring.score_answers``, the same function
``surgery-r1 bag eval`` uses: ``accuracy``, ``f_score``, ``miou`` (true IoU), ``miou_legacy`` (the
Surgical-VQLA number), ``format_rate``, and in reasoning mode ``coherence_rate``, ``claims_rate``,
``claimed_coherence_rate`` and ``subject_rate``; each report states the rules under ``definitions``
(``scoring.DEFINITIONS``).

Writes ``report.json`` (these keys, n, definitions, timing), ``per_class.csv``, ``confusion.png`` and
``predictions.jsonl`` to ``--out``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from surgery_r1_ros.boxes import Box, Size
from surgery_r1_ros.grounding import ground
from surgery_r1_ros.protocol import PromptMode
from surgery_r1_ros.scoring import AnswerRecord, score_answers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One question of the split: its frame and the truth."""

    image_path: str
    size: Size
    question: str
    answer: str
    box: Box
    subject: str | None


def items_of(data: str | Path, split: str, limit: int | None = None) -> list[Item]:
    from surgery_r1_ros.data.vqla import load_vqla

    dataset = load_vqla(data, split)
    items = [
        Item(str(f.image_path), f.size, qa.question, qa.answer, qa.box, qa.instrument) for f, qa in dataset.qa_pairs()
    ]
    if not items:
        raise ValueError(f"{data}: split {split!r} has no questions")
    return items[:limit] if limit else items


def score(items: Sequence[Item], completions: Sequence[str], mode: PromptMode, model_size: Size) -> dict:
    """The report (without timing) for completions answering ``items`` in ``mode``, with its rows under ``_rows``."""
    if len(items) != len(completions):
        raise ValueError(f"{len(items)} questions but {len(completions)} completions")
    records, rows = [], []
    for item, text in zip(items, completions, strict=True):
        grounded = ground(text, mode, model_size, item.size, item.subject)
        record = AnswerRecord(
            truth=item.answer,
            truth_box=item.box,
            frame_size=item.size,
            subject=item.subject,
            answer=grounded.answer,
            box=grounded.box,
            reasoning=grounded.reasoning,
            coherent=grounded.coherent,
        )
        records.append(record)
        rows.append(
            {
                "image": item.image_path,
                "question": item.question,
                "answer": item.answer,
                "predicted": record.label,
                "box": list(item.box),
                "predicted_box": list(grounded.box) if grounded.box else None,
                "format_ok": grounded.format_ok,
                "coherent": grounded.coherent if mode is PromptMode.REASON and grounded.reasoning else None,
                "completion": text,
            }
        )
    report = score_answers(records, mode)
    report["_rows"] = rows
    return report


FRAME_VARIANTS = ("own", "swapped", "degraded")


def swapped_frames(items: Sequence[Item]) -> dict[str, str]:
    """Each frame path -> a frame of another sequence (a fixed derangement), for the "does it read" check."""
    paths = sorted({item.image_path for item in items})
    half = len(paths) // 2
    mapping = {}
    for k, path in enumerate(paths):
        for shift in range(half, half + len(paths)):
            other = paths[(k + shift) % len(paths)]
            if Path(other).parents[1] != Path(path).parents[1]:
                break
        mapping[path] = other
    return mapping


def degrade_seed(path: str) -> int:
    """The noise seed of a frame's degraded copy, from its path within the dataset (``seq_1/left_frames/
    frame000.png``), so the same frames give the same degraded copies wherever the dataset lives."""
    return zlib.crc32("/".join(Path(path).parts[-3:]).encode())


def encode_frames_once(model, batch: dict, frame_keys: Sequence[str]) -> dict:
    """``batch`` with its frames run through the vision tower once each (``frame_keys``: one per prompt, equal
    for the same frame) and passed to the model as ``mm_encoder_outputs`` in place of ``pixel_values``.

    ``generate`` would encode every prompt's copy of the frame; a frame's questions batch together (about 5 per
    frame in the synthetic test split), and the tower was 43% of a direct-mode batch's time."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    grid = batch["image_grid_thw"]
    patches = batch.pop("pixel_values").split(grid.prod(-1).tolist())
    first: dict[str, int] = {}
    for i, key in enumerate(frame_keys):
        first.setdefault(key, i)
    unique = list(first.values())
    features = model.model.get_image_features(torch.cat([patches[i] for i in unique]), grid[unique], return_dict=True)
    by_key = dict(zip(first, features.pooler_output, strict=True))
    batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[by_key[k] for k in frame_keys])}
    return batch


def generate(
    loaded,
    items: Sequence[Item],
    mode: PromptMode,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    frames: str = "own",
    share_frames: bool = True,
):
    """Greedy completions for every item, batched; frames are decoded once and reused across questions.

    ``frames``: ``own`` (the question's frame), ``swapped`` (a frame of another sequence: a model that reads
    the image must get worse) or ``degraded`` (``augment.degrade``: it should not get much worse).
    ``share_frames``: the vision tower runs once per frame of a batch (``encode_frames_once``); False runs it
    once per question, as ``model.generate`` alone does (for comparison: same completions, slower).
    """
    if frames not in FRAME_VARIANTS:
        raise ValueError(f"frames must be one of {', '.join(FRAME_VARIANTS)}, got {frames!r}")
    import numpy as np

    from .augment import degrade

    source = swapped_frames(items) if frames == "swapped" else {}
    import torch
    from PIL import Image

    from surgery_r1_ros.model import encode_prompt

    model, processor = loaded.model, loaded.processor
    tokenizer = processor.tokenizer
    limit = max_new_tokens or (320 if mode is PromptMode.REASON else 40)
    cache: dict[str, Image.Image] = {}
    completions: list[str] = [""] * len(items)
    order = sorted(range(len(items)), key=lambda i: items[i].image_path)  # a frame's questions batch together
    from tqdm import tqdm

    for start in tqdm(range(0, len(order), batch_size), desc=f"eval ({mode})", unit="batch"):
        idx = order[start : start + batch_size]
        images = []
        for i in idx:
            path = items[i].image_path
            if path not in cache:
                if len(cache) > 256:
                    cache.clear()
                with Image.open(source.get(path, path)) as raw:
                    cache[path] = raw.convert("RGB")
                if frames == "degraded":
                    cache[path] = Image.fromarray(degrade(np.asarray(cache[path]), seed=degrade_seed(path)))
            images.append(cache[path])
        batch = encode_prompt(processor, images, [items[i].question for i in idx], [mode] * len(idx))
        batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.inference_mode():
            if share_frames:
                batch = encode_frames_once(model, batch, [items[i].image_path for i in idx])
            out = model.generate(**batch, max_new_tokens=limit, do_sample=False)
        new = out[:, batch["input_ids"].shape[1] :]
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
            completions[i] = text
    return completions


def evaluate(
    model: str | Path | None,
    data: str | Path,
    split: str,
    out: str | Path,
    reasoning: bool = False,
    batch_size: int = 16,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    frames: str = "own",
) -> dict:
    """Run the model on the split, write the report files to ``out`` and return the report."""
    import torch

    from surgery_r1_ros.model import image_size, load_model

    from .plots import plot_confusion

    items = items_of(data, split, limit)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(model, device=device)
    mode = PromptMode.REASON if reasoning else PromptMode.GROUND
    started = time.perf_counter()
    completions = generate(loaded, items, mode, batch_size, max_new_tokens, frames=frames)
    elapsed = time.perf_counter() - started
    report = score(items, completions, mode, image_size(loaded.processor))
    rows = report.pop("_rows")
    report.update(
        {
            "model": str(loaded.path),
            "data": str(data),
            "split": split,
            "frames": frames,
            "seconds": round(elapsed, 2),
            "seconds_per_question_batched": round(elapsed / len(items), 4),
            "batch_size": batch_size,
            "device": device,
        }
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out / "predictions.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with (out / "per_class.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", "precision", "recall", "f1", "support"])
        writer.writeheader()
        writer.writerows(report["per_class"])
    plot_confusion(
        report["confusion"]["labels"],
        report["confusion"]["matrix"],
        out / "confusion.png",
        f"{Path(str(loaded.path)).name} on {Path(data).name}/{split} ({mode}), acc {report['accuracy']:.3f}",
    )
    return report


def summary(report: dict) -> str:
    """One line per headline metric."""
    keys = ("n", "accuracy", "f_score", "miou_legacy", "miou", "coherence_rate", "subject_rate", "state_claim_accuracy",
            "format_rate")  # fmt: skip
    parts = []
    for k in keys:
        v = report.get(k)
        parts.append(f"{k}={'-' if v is None else (v if isinstance(v, int) else f'{v:.4f}')}")
    return f"[{report.get('mode')}] " + " ".join(parts)
