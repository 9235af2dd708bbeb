"""GRPO alone, from one SFT model, with the coherence reward's weight varied: what it does to the reasoning.

    .venv/bin/python benchmarks/grpo_reward_ablation.py --work runs/model_nc \
        --coherence 0.5 --coherence 0.0 --seed 2 --seed 3

``--work`` is a ``make model`` work folder after its SFT stages (``sft_b/final``, ``data/train_mix.jsonl``,
``data/test``). For every coherence weight and GRPO prompt order (the GRPO block's ``data.seed``) this runs the
built-in pipeline's GRPO block (``training/configs/builtin_pipeline.yaml``, that weight swapped in) and evaluates
the result on the test split in direct and reasoning mode, as the pipeline's eval stage does. Written because
the pipeline runs GRPO once, with one weight: the README's "GRPO and the coherence reward" table comes from here.
About 4 min per run on 2 CPU cores; the same command again resumes. Writes
benchmarks/results/grpo_reward_ablation.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from surgery_r1_ros.training.builtin import PIPELINE_ONLY, REPORTED, stage_config
from surgery_r1_ros.training.config import find_config
from surgery_r1_ros.training.evaluate import evaluate
from surgery_r1_ros.training.rft import run_rft

RESULTS = Path(__file__).parent / "results" / "grpo_reward_ablation.json"


def grpo_block(coherence: float, seed: int) -> dict:
    """The pipeline's GRPO block with the coherence weight and the prompt order's seed replaced."""
    spec = yaml.safe_load(find_config("builtin_pipeline").read_text())
    block = {k: v for k, v in spec["rft"].items() if k not in PIPELINE_ONLY}
    block["rewards"] = {**block["rewards"], "coherence": coherence}
    block["data"] = {**block["data"], "seed": seed}
    return block


def run(work: Path, out: Path, coherence: float, seed: int, eval_batch: int, reason_tokens: int) -> dict:
    """GRPO from ``work``'s SFT model into ``out``, then both evaluation modes on ``work``'s test split."""
    config = stage_config("rft", "rft", str(work / "sft_b" / "final"), out / "rft", work / "data" / "train_mix.jsonl",
                          grpo_block(coherence, seed))  # fmt: skip
    # A run cut short resumes: a finished model and finished reports are kept, GRPO goes on from its checkpoint.
    final = out / "rft" / "final"
    if not (final / "model.safetensors").is_file():
        final = run_rft(config, resume=True)
    row: dict = {"coherence_weight": coherence, "seed": seed, "model": str(final)}
    for mode, reasoning in (("direct", False), ("reason", True)):
        done = out / mode / "report.json"
        report = json.loads(done.read_text()) if done.is_file() else evaluate(
            final, work / "data" / "test", "all", out / mode, reasoning=reasoning, batch_size=eval_batch,
            max_new_tokens=reason_tokens if reasoning else None)  # fmt: skip
        row[mode] = {k: report[k] for k in REPORTED if k in report}  # what the pipeline's eval stage keeps
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="make model work folder after SFT")
    parser.add_argument("--out", type=Path, default=Path("runs/grpo_reward_ablation"))
    parser.add_argument("--coherence", type=float, action="append", required=True, help="weight (repeatable)")
    parser.add_argument("--seed", type=int, action="append", required=True, help="GRPO data.seed (repeatable)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--reason-max-new-tokens", type=int, default=192)
    args = parser.parse_args()
    rows = [run(args.work, args.out / f"coherence{weight:g}_seed{seed}", weight, seed, args.eval_batch_size,
                args.reason_max_new_tokens)
            for weight in args.coherence for seed in args.seed]  # fmt: skip
    for row in rows:
        d, r = row["direct"], row["reason"]
        print(f"coherence {row['coherence_weight']:g} seed {row['seed']}: reasoning names a state "
              f"{r['state_claims_rate']:.3f}, right {r['state_claim_accuracy']:.3f}, accuracy {r['accuracy']:.3f}, "
              f"names the subject {r['subject_rate']:.3f}; direct accuracy {d['accuracy']:.3f}, "
              f"true mIoU {d['miou']:.3f}")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"work": str(args.work), "runs": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
