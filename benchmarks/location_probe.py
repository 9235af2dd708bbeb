"""Where does an instrument's location get lost between the frame and the answer?

    .venv/bin/python benchmarks/location_probe.py --model surgery_r1_ros/resources/builtin_model \
        --mix runs/builtin/data/train_mix.jsonl \
        --predictions runs/builtin/eval/last_layer/direct/predictions.jsonl

On the location questions of a test split (taken from an eval's ``predictions.jsonl``: frame, question, true box,
the model's answer) and of the training mix, one teacher-forced pass of the model (grounding prompt) gives:
- per decoder layer's input (and the final hidden state), the mean hidden state over the image tokens inside the
  question's true box; a logistic regression fitted on the training questions reads the quadrant off it on the
  test questions: is the position there at all, once the right tokens are found?
- the last layer's attention output, per head, at the position that predicts the answer's first token; the same
  probe: does what the layer reads carry the position?
- the last layer's first head's attention mass on the box there, and the model's location answers right by that
  mass: does it look at the instrument asked about?
Writes benchmarks/results/location_probe.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from surgery_r1_ros.training.box_attention import captured_attention
from surgery_r1_ros.training.config import DataConfig
from surgery_r1_ros.training.dataset import ImageCache, SFTCollator, load_records, sft_row
from tqdm import tqdm

from surgery_r1_ros.model import IGNORE_INDEX, image_size, load_model

RESULTS = Path(__file__).parent / "results" / "location_probe.json"
MASS_BINS = (0.0, 0.2, 0.5, 0.8, 1.01)
log = logging.getLogger("location_probe")


def quadrant(box: list[float], size: tuple[int, int]) -> int:
    """The location label's quadrant of ``box`` (0 left-top, 1 left-bottom, 2 right-top, 3 right-bottom)."""
    x1, y1, x2, y2 = box
    return 2 * int((x1 + x2) / 2 >= size[0] / 2) + int((y1 + y2) / 2 >= size[1] / 2)


def test_rows(predictions: Path, size: tuple[int, int]) -> tuple[list[dict], np.ndarray]:
    """The location questions of an eval's predictions as grounding rows, and whether the model answered right."""
    kept = [p for p in map(json.loads, predictions.read_text().splitlines()) if p["question"].startswith("Where")]
    if not kept:
        raise SystemExit(f"{predictions}: no location questions ('Where is ...')")
    rows = [sft_row({"image": p["image"], "question": p["question"], "answer": p["answer"], "box": p["box"],
                     "image_size": list(size), "kind": "grounding"}, size) for p in kept]  # fmt: skip
    return rows, np.array([p["predicted"] == p["answer"] for p in kept])


@torch.inference_mode()
def read(loaded, rows: list[dict], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per row: box-mean hidden state per layer input and at the end, the last layer's per-head attention output
    and its first head's mass on the box at the position that predicts the answer, and the true quadrant."""
    model, size = loaded.model, image_size(loaded.processor)
    heads = model.model.language_model.layers[-1].self_attn
    taken: dict[str, torch.Tensor] = {}
    hook = heads.o_proj.register_forward_pre_hook(lambda _m, args: taken.__setitem__("heads", args[0]))
    collate = SFTCollator(loaded.processor, ImageCache(), box_cells=True)
    out: dict[str, list] = {"layers": [], "heads": [], "mass": [], "quadrant": []}
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="location probe", unit="batch"):
            chunk = rows[start : start + batch_size]
            batch = collate(chunk)
            cells, labels = batch.pop("box_cells"), batch.pop("labels")
            with captured_attention(model) as weights:
                hidden = model(**batch, output_hidden_states=True).hidden_states
            image = batch["input_ids"] == model.config.image_token_id
            for i, row in enumerate(chunk):
                inside = image[i].nonzero().flatten()[cells[i]]
                at = int((labels[i] != IGNORE_INDEX).nonzero().flatten()[1]) - 1  # predicts the answer's first token
                out["layers"].append(torch.stack([h[i, inside].mean(0) for h in hidden]).numpy())
                out["heads"].append(taken["heads"][i, at].view(heads.config.num_attention_heads, -1).numpy())
                out["mass"].append(float(weights[-1][i, 0, at, inside].sum()))
                out["quadrant"].append(quadrant(row["attend_box"], size))
    finally:
        hook.remove()
    return {key: np.array(value) for key, value in out.items()}


def probe(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray) -> float:
    """Held-out accuracy of a logistic regression from ``train`` features to quadrants."""
    fitted = LogisticRegression(max_iter=3000).fit(train.reshape(len(train), -1), train_y)
    return round(float(fitted.score(test.reshape(len(test), -1), test_y)), 3)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--mix", type=Path, required=True, help="training mix the probes are fitted on")
    parser.add_argument("--predictions", type=Path, required=True, help="the model's eval predictions.jsonl")
    parser.add_argument("--train-questions", type=int, default=12000, help="mix questions drawn (~40%% location)")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model, attn_implementation="eager")  # attention weights: eager, not SDPA
    loaded.model.eval()
    size = image_size(loaded.processor)
    mix = load_records(DataConfig(mix=str(args.mix), kinds=["grounding"], limit=args.train_questions, seed=5))
    train_rows = [r for r in (sft_row(m, size) for m in mix) if r["question"].startswith("Where")]
    rows, right = test_rows(args.predictions, size)
    train, test = read(loaded, train_rows), read(loaded, rows)
    layers = train["layers"].shape[1]
    names = [f"layer {k} input" for k in range(layers - 1)] + ["final hidden state"]
    by_mass = {}
    for low, high in itertools.pairwise(MASS_BINS):
        chosen = (test["mass"] >= low) & (test["mass"] < high)
        share = round(float(right[chosen].mean()), 3) if chosen.any() else None
        by_mass[f"{low}-{min(high, 1.0)}"] = {"questions": int(chosen.sum()), "answers_right": share}
    result = {
        "model": args.model, "predictions": str(args.predictions), "train_questions": len(train_rows),
        "test_questions": len(rows), "location_answers_right": round(float(right.mean()), 3),
        "quadrant_from_box_mean": {name: probe(train["layers"][:, k], train["quadrant"], test["layers"][:, k],
                                               test["quadrant"]) for k, name in enumerate(names)},
        "quadrant_from_last_layer_heads": {
            "all heads": probe(train["heads"], train["quadrant"], test["heads"], test["quadrant"]),
            **{f"head {h}": probe(train["heads"][:, h], train["quadrant"], test["heads"][:, h], test["quadrant"])
               for h in range(train["heads"].shape[1])},
        },
        "first_head_mass_on_box": round(float(test["mass"].mean()), 3),
        "answers_right_by_first_head_mass": by_mass,
    }  # fmt: skip
    log.info(json.dumps(result, indent=2))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.model] = result
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
