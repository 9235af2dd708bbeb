"""Evaluation speed: the vision tower once per frame of a batch (``generate(share_frames=True)``) or per question.

    .venv/bin/python benchmarks/bench_eval.py --data runs/builtin/data/test   # the pipeline's held-out split

Runs ``evaluate.generate`` over every question of the split, back to back in both ways (greedy, direct
mode by default, the built-in model unless ``--model``), checks that the completions are identical and
writes the seconds to benchmarks/results/eval_frames_once.json. Run nothing else CPU-heavy beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from surgery_r1_ros.training import evaluate

from surgery_r1_ros.model import load_model
from surgery_r1_ros.protocol import PromptMode

RESULTS = Path(__file__).parent / "results" / "eval_frames_once.json"


def timed_completions(loaded, items, mode: PromptMode, batch_size: int, once: bool) -> tuple[float, list[str]]:
    """Seconds for ``generate`` over ``items`` and its completions, the tower run once per frame or per question."""
    start = time.perf_counter()
    completions = evaluate.generate(loaded, items, mode, batch_size, share_frames=once)
    return time.perf_counter() - start, completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (EndoVis-VQLA layout)")
    parser.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    parser.add_argument("--mode", default="ground", choices=[str(m) for m in PromptMode])
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    loaded = load_model(args.model)
    items = evaluate.items_of(args.data, "all")
    mode = PromptMode(args.mode)
    evaluate.generate(loaded, items[: args.batch_size], mode, args.batch_size)  # warm-up
    every_s, every = timed_completions(loaded, items, mode, args.batch_size, once=False)
    once_s, once = timed_completions(loaded, items, mode, args.batch_size, once=True)
    result = {
        "questions": len(items),
        "frames": len({item.image_path for item in items}),
        "mode": str(mode),
        "batch_size": args.batch_size,
        "seconds_tower_per_question": round(every_s, 1),
        "seconds_tower_per_frame": round(once_s, 1),
        "speedup": round(every_s / once_s, 2),
        "identical_completions": once == every,
        "machine": platform.platform(),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
