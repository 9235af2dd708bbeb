"""``surgery-r1 train sft|rft|readout|last-layer|builtin``, ``surgery-r1 eval``, ``probe`` and ``probe-states``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from surgery_r1_ros.vocab import QuestionKind


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train: SFT, GRPO, or the whole built-in model pipeline")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="STAGE")
    for stage, text in (("sft", "stage 1: supervised fine-tuning (TRL SFTTrainer)"),
                        ("rft", "stage 2: reinforcement fine-tuning with GRPO (TRL GRPOTrainer)")):  # fmt: skip
        p = sub.add_parser(stage, help=text)
        p.add_argument("--config", required=True, help="YAML run config (a file, or a shipped name: builtin_sft, ...)")
        p.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
        p.add_argument("--output-dir", help="override the config's output_dir")
        p.add_argument("--model", help="override the config's starting model")
        p.add_argument("--max-steps", type=int, help="override trainer.max_steps")
        p.set_defaults(handler=_train, stage=stage)

    readout = sub.add_parser("readout", help="refit the output head's answer, tag, name, state rows on cached states")
    _refit_arguments(readout, questions=2000)
    readout.add_argument("--steps", type=int, default=400)
    readout.set_defaults(handler=_readout)

    last = sub.add_parser("last-layer", help="train the language model's last layer on cached inputs (rest frozen)")
    _refit_arguments(last, questions=4000)
    last.add_argument("--epochs", type=int, default=4)
    last.add_argument("--lr", type=float, default=3e-4)
    last.add_argument(
        "--label-boxes", action="store_true",
        help="fit box positions to the label boxes (default: to the model's own box distribution)",
    )  # fmt: skip
    last.add_argument("--box-attention", type=float, default=0.0,
                      help="weight of a loss that makes the layer's first head look at the question's box while it "
                           "writes the answer, the box and the reasoning about the question's subject "
                           "(training/box_attention.py); 0: off")  # fmt: skip
    last.add_argument("--box-attention-questions", nargs="+", choices=[str(k) for k in QuestionKind],
                      default=None, help="question kinds box attention applies to (default: all)")  # fmt: skip
    last.set_defaults(handler=_last_layer)

    builtin = sub.add_parser("builtin", help="reproduce the built-in model: synth data, SFT, GRPO, eval, model card")
    builtin.add_argument("--out", type=Path, required=True, help="folder for the finished model (written in place)")
    builtin.add_argument("--work", type=Path, default=Path("runs/builtin"), help="data, checkpoints and reports")
    builtin.add_argument("--config", default="builtin_pipeline", help="pipeline YAML (shipped: builtin_pipeline)")
    builtin.add_argument("--resume", action="store_true", help="skip finished stages and resume the current one")
    builtin.set_defaults(handler=_builtin)

    ev = subparsers.add_parser("eval", help="evaluate a model on a VQLA-format split (JSON report, per-class table)")
    ev.add_argument("--model", type=Path, default=None, help="model folder (default: the built-in model)")
    ev.add_argument("--data", type=Path, required=True, help="dataset folder (EndoVis-18/17-VQLA layout)")
    ev.add_argument("--split", default="test", choices=("train", "test", "all"))
    ev.add_argument("--out", type=Path, required=True, help="report folder")
    ev.add_argument("--reasoning", action=argparse.BooleanOptionalAction, default=False,
                    help="chain-of-thought prompt (default: direct answer with box)")  # fmt: skip
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    ev.add_argument("--max-new-tokens", type=int, default=None)
    ev.add_argument("--frames", default="own", choices=("own", "swapped", "degraded"),
                    help="own frames; frames of another sequence (does the model read the image? it must get "
                         "worse); degraded frames (JPEG 45, 20%% darker, noise: it should not)")  # fmt: skip
    ev.set_defaults(handler=_eval)

    probe = subparsers.add_parser("probe", help="what the vision tower offers a reader (attentive probe)")
    probe.add_argument("--model", type=Path, required=True, help="model folder whose vision tower is probed")
    probe.add_argument("--train", type=Path, required=True, help="synthetic dataset with dense sidecars (training)")
    probe.add_argument("--test", type=Path, required=True, help="held-out synthetic dataset with dense sidecars")
    probe.add_argument("--train-frames", type=int, default=4000, help="use the first N training frames")
    probe.add_argument("--steps", type=int, default=3000)
    probe.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    probe.set_defaults(handler=_probe)

    states = subparsers.add_parser("probe-states", help="where the language model holds states (linear probe)")
    states.add_argument("--model", required=True, help="model folder (or 'builtin')")
    states.add_argument("--train", type=Path, required=True, help="dataset the probe is fitted on (training split)")
    states.add_argument("--test", type=Path, required=True, help="held-out dataset the probe is scored on")
    states.add_argument("--questions", type=int, default=1500, help="state questions of --train to fit on")
    states.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    states.set_defaults(handler=_probe_states)


def _refit_arguments(parser: argparse.ArgumentParser, questions: int) -> None:
    """The model, mix, output and rows of a refit on the training mix (readout, last-layer)."""
    parser.add_argument("--model", required=True, help="model folder (or 'builtin')")
    parser.add_argument("--mix", type=Path, required=True, help="training mix (JSONL; surgery-r1 data mix)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the refit model")
    parser.add_argument("--questions", type=int, default=questions, help="questions of the mix to fit on")
    parser.add_argument("--kinds", nargs="+", default=["grounding", "vqa", "cot"], help="mix record kinds")
    parser.add_argument(
        "--own-reasoning", type=int, default=0, metavar="N",
        help="also fit the answer and tag positions after the model's own reasoning on N reasoning questions",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the rows chosen, held out and shuffled")


def _train(args: argparse.Namespace) -> int:
    from .config import load_config

    overrides = {}
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.model:
        overrides["model"] = args.model
    if args.max_steps is not None:
        overrides["trainer.max_steps"] = args.max_steps
    config = load_config(args.config, overrides)
    if config.stage != args.stage:
        raise ValueError(f"{config.source} is a {config.stage!r} config; use `surgery-r1 train {config.stage}`")
    if args.stage == "sft":
        from .sft import run_sft

        final = run_sft(config, resume=args.resume)
    else:
        from .rft import run_rft

        final = run_rft(config, resume=args.resume)
    print(f"model written to {final}")
    return 0


def _readout(args: argparse.Namespace) -> int:
    from .readout import refit_readout

    result = refit_readout(
        args.model, args.mix, args.out, args.questions, tuple(args.kinds), args.steps,
        own_reasoning=args.own_reasoning, seed=args.seed,
    )  # fmt: skip
    print(json.dumps(result, indent=2))
    print(f"model written to {args.out}")
    return 0


def _last_layer(args: argparse.Namespace) -> int:
    from .last_layer import refit_last_layer

    result = refit_last_layer(
        args.model, args.mix, args.out, args.questions, tuple(args.kinds), args.epochs, args.lr,
        keep_boxes=not args.label_boxes, own_reasoning=args.own_reasoning, box_attention=args.box_attention,
        box_attention_questions=args.box_attention_questions, seed=args.seed,
    )  # fmt: skip
    print(json.dumps(result, indent=2))
    print(f"model written to {args.out}")
    return 0


def _builtin(args: argparse.Namespace) -> int:
    from .builtin import run_builtin

    card = run_builtin(args.out, args.work, args.config, resume=args.resume)
    print(f"built-in model written to {args.out} (model card {card})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, summary

    report = evaluate(
        args.model,
        args.data,
        args.split,
        args.out,
        args.reasoning,
        args.batch_size,
        args.limit,
        args.max_new_tokens,
        frames=args.frames,
    )
    print(summary(report))
    print(f"report: {args.out / 'report.json'}")
    headline = {k: report[k] for k in ("accuracy", "f_score", "miou_legacy", "miou", "coherence_rate", "format_rate")}
    print(json.dumps(headline))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from .reader_probe import probe_reader

    return _print_result(probe_reader(args.model, args.train, args.test, args.train_frames, args.steps), args.out)


def _probe_states(args: argparse.Namespace) -> int:
    from .state_probe import probe_states

    return _print_result(probe_states(args.model, args.train, args.test, args.questions), args.out)


def _print_result(result: dict, out: Path | None) -> int:
    """Print a probe's result as JSON (and write it to ``out``)."""
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0
