"""Evaluation on a VQLA-format split: accuracy, F-score, legacy and true mIoU, coherence and format rates.

    surgery-r1 eval [--model DIR] --data DIR --split test --out DIR [--reasoning]

The model (default: the built-in one) answers every question of the split with batched greedy decoding.
Completions are read with ``protocol.parse_output``; its box (model-input pixels) is scaled back to the
frame. Scoring uses ``surgery_r1_ros.metrics``:

- ``accuracy``, ``f_score``: exact label match, macro F (sklearn, zero_division=1). A completion with no
  readable vocabulary answer counts as the label ``<none>``, i.e. wrong.
- ``miou``: true IoU in the frame's pixels; a missing box scores 0.
- ``miou_legacy``: the Surgical-VQLA score (normalised boxes, "+1" rule, no clamp); a missing box is the
  zero box ``[0,0,0,0]``.
- ``format_rate``: share of completions with every part the prompt mode asks for
  (``ParsedOutput.format_ok``: a vocabulary answer and a box, plus non-empty reasoning in reasoning mode).
- ``coherence_rate`` (reasoning mode only, else null): among completions that contain non-empty
  reasoning, the share that also hold a readable box and whose position claims about the question's
  subject are all consistent with that box (``coherence.check_coherence``). A completion with reasoning
  but no readable box counts as incoherent; reasoning with no checkable claim counts as coherent
  (``claims_rate`` says how many made at least one claim).

Writes ``report.json`` (these keys, n, definitions, timing), ``per_class.csv``, ``confusion.png`` and
``predictions.jsonl`` to ``--out``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from surgery_r1_ros import metrics
from surgery_r1_ros.boxes import Box, Size, scale_box
from surgery_r1_ros.coherence import check_coherence
from surgery_r1_ros.protocol import PromptMode, parse_output

log = logging.getLogger(__name__)

NONE_LABEL = "<none>"
ZERO_BOX: Box = (0.0, 0.0, 0.0, 0.0)
DEFINITIONS = {
    "accuracy": "share of questions whose parsed answer equals the label (unreadable answers are wrong)",
    "f_score": "macro F1 over labels seen in truth or prediction (sklearn, zero_division=1)",
    "miou": "mean true IoU of predicted and true boxes in frame pixels; a missing box scores 0",
    "miou_legacy": "Surgical-VQLA mIoU (normalised boxes, +1 rule, no clamp); a missing box is [0,0,0,0]",
    "format_rate": "share of completions with every part the prompt mode asks for (protocol format_ok)",
    "coherence_rate": (
        "reasoning mode only: among completions with non-empty reasoning, the share that have a readable box "
        "and no position claim about the question's subject contradicted by it (coherence.check_coherence); "
        "reasoning without a box is incoherent, reasoning without a checkable claim is coherent"
    ),
    "claims_rate": "reasoning mode only: among completions with reasoning, the share making >=1 checked claim",
}


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
    """The report (without timing) for completions answering ``items`` in ``mode``."""
    if len(items) != len(completions):
        raise ValueError(f"{len(items)} questions but {len(completions)} completions")
    truth, predicted, true_boxes, boxes, legacy_boxes, sizes = [], [], [], [], [], []
    formatted = with_reasoning = coherent = with_claims = 0
    rows = []
    for item, text in zip(items, completions, strict=True):
        parsed = parse_output(text)
        label = parsed.answer if parsed.answer_in_vocabulary else NONE_LABEL
        box = scale_box(parsed.box, model_size, item.size) if parsed.box is not None else None
        truth.append(item.answer)
        predicted.append(label)
        true_boxes.append(item.box)
        boxes.append(box)
        legacy_boxes.append(box if box is not None else ZERO_BOX)
        sizes.append(item.size)
        ok = parsed.format_ok(mode)
        formatted += ok
        row_coherent = None
        if mode is PromptMode.REASON and parsed.reasoning:
            with_reasoning += 1
            if parsed.box is not None:
                result = check_coherence(parsed.reasoning, parsed.box, model_size, item.subject)
                row_coherent = result.coherent
                with_claims += result.has_claims
            else:
                row_coherent = False
            coherent += row_coherent
        rows.append(
            {
                "image": item.image_path,
                "question": item.question,
                "answer": item.answer,
                "predicted": label,
                "box": list(item.box),
                "predicted_box": [round(v, 1) for v in box] if box else None,
                "format_ok": bool(ok),
                "coherent": row_coherent,
                "completion": text,
            }
        )
    n = len(items)
    reasoning_mode = mode is PromptMode.REASON
    report = {
        "n": n,
        "mode": str(mode),
        "accuracy": metrics.accuracy(truth, predicted),
        "f_score": metrics.f_score(truth, predicted),
        "miou_legacy": metrics.legacy_miou(true_boxes, legacy_boxes, sizes),
        "miou": metrics.mean_iou(true_boxes, boxes),
        "coherence_rate": (coherent / with_reasoning if with_reasoning else 0.0) if reasoning_mode else None,
        "format_rate": formatted / n if n else 0.0,
        "n_with_reasoning": with_reasoning if reasoning_mode else None,
        "claims_rate": (with_claims / with_reasoning if with_reasoning else 0.0) if reasoning_mode else None,
        "per_class": [vars(r) for r in metrics.per_class(truth, predicted)],
        "definitions": DEFINITIONS,
    }
    labels = sorted(set(truth)) + sorted(set(predicted) - set(truth))
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t]][index[p]] += 1
    report["confusion"] = {"labels": labels, "matrix": matrix}
    report["_rows"] = rows
    return report


def generate(loaded, items: Sequence[Item], mode: PromptMode, batch_size: int = 16, max_new_tokens: int | None = None):
    """Greedy completions for every item, batched; frames are decoded once and reused across questions."""
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
                with Image.open(path) as raw:
                    cache[path] = raw.convert("RGB")
            images.append(cache[path])
        batch = encode_prompt(processor, images, [items[i].question for i in idx], [mode] * len(idx))
        batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.inference_mode():
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
    completions = generate(loaded, items, mode, batch_size, max_new_tokens)
    elapsed = time.perf_counter() - started
    report = score(items, completions, mode, image_size(loaded.processor))
    rows = report.pop("_rows")
    report.update(
        {
            "model": str(loaded.path),
            "data": str(data),
            "split": split,
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
    keys = ("n", "accuracy", "f_score", "miou_legacy", "miou", "coherence_rate", "format_rate")
    parts = []
    for k in keys:
        v = report.get(k)
        parts.append(f"{k}={'-' if v is None else (v if isinstance(v, int) else f'{v:.4f}')}")
    return f"[{report.get('mode')}] " + " ".join(parts)
