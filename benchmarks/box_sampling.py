"""How much better a box the model holds than the one greedy decoding writes.

    .venv/bin/python benchmarks/box_sampling.py --predictions R/predictions.jsonl [--model DIR] [--questions 240]

Takes an ``surgery-r1 eval`` run's direct-mode predictions (greedy), keeps each completion up to ``<box>``
and samples ``--samples`` box continuations from the model at temperature 1, then scores against the true
box: the greedy box, the per-coordinate median and mean of the samples, the sample closest to the others
(highest mean IoU with them) and the best sample (an oracle: what the model's distribution holds at all).
Per question type (organ, state, location) and overall; writes benchmarks/results/box_sampling.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from surgery_r1_ros.boxes import iou
from surgery_r1_ros.model import load_model
from surgery_r1_ros.model.prompts import prompt_texts
from surgery_r1_ros.protocol import PromptMode, parse_output
from surgery_r1_ros.vocab import parse_question

RESULTS = Path(__file__).parent / "results" / "box_sampling.json"
RULES = ("greedy", "median", "mean", "consensus", "best_sample")


def question_type(question: str) -> str:
    """organ, state or location: the kind ``vocab.parse_question`` reads from the question."""
    return str(parse_question(question)[0])


@torch.inference_mode()
def sampled_boxes(loaded, row: dict, samples: int) -> list[tuple[float, ...]]:
    """Box continuations sampled after the greedy completion's text up to ``<box>``."""
    tokenizer = loaded.processor.tokenizer
    prefix = row["completion"].split("<box>")[0] + "<box>"
    image = Image.open(row["image"]).convert("RGB")
    prompt = prompt_texts(loaded.processor, [row["question"]], [PromptMode.GROUND])[0] + prefix
    batch = loaded.processor(images=[image], text=[prompt], return_tensors="pt")
    out = loaded.model.generate(**batch.to(loaded.device), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                num_return_sequences=samples, max_new_tokens=24)  # fmt: skip
    boxes = []
    for sequence in out[:, batch["input_ids"].shape[1] :]:
        text = tokenizer.decode(sequence, skip_special_tokens=False)  # the tags may be special tokens
        box = parse_output(prefix + text).box
        if box is not None:
            boxes.append(box)
    return boxes


def rule_ious(row: dict, boxes: list[tuple[float, ...]]) -> dict[str, float]:
    truth = tuple(row["box"])
    stacked = np.array(boxes)
    agreement = np.array([[iou(a, b) for b in boxes] for a in boxes]).mean(1)
    return {
        "greedy": iou(tuple(row["predicted_box"]), truth),
        "median": iou(tuple(np.median(stacked, 0)), truth),
        "mean": iou(tuple(stacked.mean(0)), truth),
        "consensus": iou(boxes[int(agreement.argmax())], truth),
        "best_sample": max(iou(b, truth) for b in boxes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, required=True, help="predictions.jsonl of a direct-mode eval")
    parser.add_argument("--model", default=None, help="the model that wrote them (default: the built-in model)")
    parser.add_argument("--questions", type=int, default=240)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rows = [json.loads(line) for line in args.predictions.read_text().splitlines()]
    random.Random(args.seed).shuffle(rows)  # before filtering: two models' runs on one split share their questions
    rows = [r for r in rows if r["box"] is not None and r["predicted_box"] is not None]
    loaded = load_model(args.model)
    scored: list[tuple[str, dict[str, float]]] = []
    for row in tqdm(rows[: args.questions], desc="sampling boxes", unit="question"):
        boxes = sampled_boxes(loaded, row, args.samples)
        if boxes:
            scored.append((question_type(row["question"]), rule_ious(row, boxes)))
    result = {"predictions": str(args.predictions), "model": args.model or "builtin", "samples": args.samples}
    for kind in ("organ", "state", "location", "all"):
        chosen = [s for k, s in scored if kind in ("all", k)]
        result[kind] = {"n": len(chosen), **{r: round(float(np.mean([s[r] for s in chosen])), 3) for r in RULES}}
        print(kind, result[kind])
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
