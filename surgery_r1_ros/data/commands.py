"""``surgery-r1 data ...``: synthesize, check, mix and picture Surgical-VQLA datasets."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="make, check, mix and picture VQLA datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    synth = sub.add_parser("synth", help="generate synthetic endoscope scenes in the EndoVis-18-VQLA layout")
    synth.add_argument("--out", type=Path, required=True, help="output dataset folder")
    synth.add_argument("--sequences", type=int, default=4, help="number of sequences (seq_1, seq_2, ...)")
    synth.add_argument("--frames-per-sequence", type=int, default=25)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", default="1280x1024", help="frame size WxH")
    synth.add_argument("--test-fraction", type=float, default=0.25, help="share of sequences in the test split")
    synth.add_argument("--difficulty", default="normal", choices=("easy", "normal", "hard"))
    synth.add_argument("--workers", type=int, default=1, help="processes rendering in parallel")
    synth.set_defaults(handler=_synth)

    check = sub.add_parser("check", help="load a dataset through the EndoVis loader and print its counts")
    _add_dataset_args(check)
    check.set_defaults(handler=_check)

    mix = sub.add_parser("mix", help="write the Surgery-R1 training mix (VQA, grounding, chain of thought)")
    _add_dataset_args(mix)
    mix.add_argument("--out", type=Path, required=True, help="output JSONL file")
    mix.add_argument("--seed", type=int, default=0)
    mix.set_defaults(handler=_mix)

    stats = sub.add_parser("stats", help="answer distribution PNG and a contact sheet of labelled frames")
    _add_dataset_args(stats)
    stats.add_argument("--out", type=Path, required=True, help="output folder for the PNGs")
    stats.add_argument("--frames", type=int, default=16, help="frames on the contact sheet")
    stats.set_defaults(handler=_stats)


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (EndoVis-18/17-VQLA layout)")
    parser.add_argument("--split", default="all", choices=("train", "test", "all"))
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad label lines instead of stopping")


def _load(args: argparse.Namespace):
    from surgery_r1_ros.data.vqla import load_vqla

    dataset = load_vqla(args.data, args.split, skip_bad=args.skip_bad)
    if dataset.skipped:
        print(f"skipped {len(dataset.skipped)} bad label line(s)/frame(s); first: {dataset.skipped[0]}")
    if not dataset.frames:
        raise ValueError(f"{args.data}: split {args.split!r} has no frames")
    return dataset


def _synth(args: argparse.Namespace) -> int:
    from surgery_r1_ros.boxes import parse_size
    from surgery_r1_ros.data.synth import SynthOptions, generate_dataset

    options = SynthOptions(
        sequences=args.sequences,
        frames_per_sequence=args.frames_per_sequence,
        seed=args.seed,
        size=parse_size(args.size),
        test_fraction=args.test_fraction,
        difficulty=args.difficulty,
    )
    report = generate_dataset(args.out, options, workers=args.workers)
    # counts only: the summary names every test sequence, thousands of them for a large dataset
    print(
        f"wrote {report.frames} frames, {report.qa_pairs} QA pairs to {report.out} in {report.seconds:.1f} s "
        f"({report.frames_per_second:.1f} frames/s, {report.frames_per_cpu_second:.1f} per CPU-second)"
    )
    print(f"split: {len(report.train)} train / {len(report.test)} test sequences in {args.out / 'splits.json'}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from surgery_r1_ros.data.stats import count_answers, format_counts

    dataset = _load(args)
    print(f"{args.data} [{args.split}]: {len(dataset.frames)} frames, {len(dataset)} QA pairs")
    print(format_counts(count_answers(dataset)))
    return 0


def _mix(args: argparse.Namespace) -> int:
    from surgery_r1_ros.data.mix import build_mix, format_mix_counts, write_mix

    records = build_mix(_load(args), seed=args.seed)
    write_mix(records, args.out)
    print(f"wrote {len(records)} records to {args.out}")
    print(format_mix_counts(records))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from surgery_r1_ros.data.stats import count_answers, format_counts, write_answer_histogram, write_contact_sheet

    dataset = _load(args)
    args.out.mkdir(parents=True, exist_ok=True)
    hist = write_answer_histogram(dataset, args.out / "answers.png")
    sheet = write_contact_sheet(dataset, args.out / "contact_sheet.png", frames=args.frames)
    print(format_counts(count_answers(dataset)))
    print(f"wrote {hist} and {sheet}")
    return 0
