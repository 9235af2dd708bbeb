"""The one-pair "does it read the frame?" check, repeated over many frame pairs.

    .venv/bin/python benchmarks/next_token_frame_check.py --data runs/builtin/data/test \
        --model builtin --model runs/other_model

A quick check some tools run (ours: none; a before-stop hook of this workplace does) asks the model one
location question about two frames and compares the next-token logits where the answer starts: it says the
model "reads the frame" if they differ by more than 5% of the largest logit. One pair is a coin toss for a
model whose first token is a fixed protocol tag (``<answer>``), so this repeats it over ``--pairs`` pairs of
frames from different sequences and reports how often each model passes, and the spread of the ratio. It is a
weak signal beside ``surgery-r1 eval --frames swapped`` (what the answers do with the wrong frames).
Writes benchmarks/results/next_token_frame_check.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image

from surgery_r1_ros.model import load_model
from surgery_r1_ros.model.prompts import encode_prompt
from surgery_r1_ros.protocol import PromptMode

RESULTS = Path(__file__).parent / "results" / "next_token_frame_check.json"
QUESTION = "Where is bipolar_forceps located?"
THRESHOLD = 0.05  # of the largest logit, as the one-pair check


def frame_pairs(data: Path, pairs: int, seed: int) -> list[tuple[Path, Path]]:
    """``pairs`` random pairs of frames from two different sequences of ``data``."""
    frames = sorted(data.glob("seq_*/left_frames/*.png"))
    if len({f.parents[1] for f in frames}) < 2:
        raise SystemExit(f"{data}: need frames of at least two sequences (seq_*/left_frames/*.png)")
    rng = random.Random(seed)
    chosen = []
    while len(chosen) < pairs:
        a, b = rng.sample(frames, 2)
        if a.parents[1] != b.parents[1]:
            chosen.append((a, b))
    return chosen


@torch.inference_mode()
def logit_ratios(model: str | None, pairs: list[tuple[Path, Path]]) -> list[float]:
    """Per pair: max |difference| of the next-token logits between the two frames / max |logit|."""
    loaded = load_model(model)
    ratios = []
    for a, b in pairs:
        images = [Image.open(p).convert("RGB") for p in (a, b)]
        batch = encode_prompt(loaded.processor, images, [QUESTION, QUESTION], PromptMode.GROUND)
        logits = loaded.model(**batch.to(loaded.device)).logits[:, -1, :].float()
        ratios.append(float((logits[0] - logits[1]).abs().max() / logits.abs().max()))
    return ratios


def summary(ratios: list[float]) -> dict:
    ordered = sorted(ratios)
    n = len(ordered)
    return {
        "pairs": n,
        "passes": sum(r > THRESHOLD for r in ordered),
        "ratio_p10": round(ordered[n // 10], 4),
        "ratio_median": round(ordered[n // 2], 4),
        "ratio_p90": round(ordered[9 * n // 10], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (EndoVis-VQLA layout)")
    parser.add_argument("--model", action="append", default=None, help="model folder or 'builtin' (repeatable)")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    pairs = frame_pairs(args.data, args.pairs, args.seed)
    result = {"data": str(args.data), "question": QUESTION, "threshold": THRESHOLD, "models": {}}
    for model in args.model or ["builtin"]:
        result["models"][model] = summary(logit_ratios(None if model == "builtin" else model, pairs))
        print(model, result["models"][model], flush=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
