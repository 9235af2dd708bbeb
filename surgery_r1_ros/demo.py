"""``surgery-r1 demo`` (``make demo``): the whole loop on this machine in a few minutes.

1. writes a synthetic stereo endoscope bag (``bag synth``) to a temporary folder;
2. starts the ROS 2 node (``surgery_r1_node``) with the built-in model, on a random DDS domain with the
   shared-memory transport only, so nothing leaves this machine;
3. replays the bag into it and asks the bag's ground-truth questions (all of them by default) at their stamps
   through ``~/ask`` (``bag eval --pace pause``), printing each answer with its reasoning, box and latency;
4. writes the annotated frames and the evaluation report (JSON, Markdown, PNG sheet) to ``reports/demo``;
5. stops everything it started and checks that no process and no Fast DDS shared-memory file is left.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUT = Path("reports/demo")
BUDGET_S = 300.0


@dataclass
class DemoOptions:
    out: Path = DEFAULT_OUT
    seconds: float = 3.0
    questions: int | None = None  # None: every question of the bag (26 in the default 3 s bag)
    size: tuple[int, int] = (640, 512)
    seed: int = 7
    model: str | None = None
    reasoning: bool = True
    storage: str = "mcap"
    keep_bag: bool = False
    startup_timeout_s: float = 180.0
    timeout_s: float = 60.0


@dataclass
class DemoResult:
    out: Path
    report: object
    paths: dict
    seconds: float
    leftovers: list[str]

    @property
    def clean(self) -> bool:
        return not self.leftovers


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="generate a bag, start the node, ask questions, print answers, write reports/demo (make demo)",
        description=__doc__.split("\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    demo.add_argument("--seconds", type=float, default=3.0, help="length of the generated bag (default 3)")
    demo.add_argument(
        "--questions", type=int, default=None, help="how many questions to ask (default: all of the bag's, 26 in 3 s)"
    )
    demo.add_argument("--size", default="640x512", help="frame size WxH (default 640x512; the dVRK is 1280x1024)")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    demo.add_argument("--reasoning", default="on", choices=("on", "off"))
    demo.add_argument("--keep-bag", action="store_true", help="keep the generated bag in OUT/bag")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from surgery_r1_ros.boxes import parse_size

    options = DemoOptions(
        out=args.out,
        seconds=args.seconds,
        questions=args.questions,
        size=parse_size(args.size),
        seed=args.seed,
        model=args.model,
        reasoning=args.reasoning == "on",
        keep_bag=args.keep_bag,
    )
    result = run_demo(options)
    return 0 if result.clean else 1


def preflight() -> None:
    """Fail early, in one line, when the setup is incomplete."""
    problems = []
    try:
        import rclpy  # noqa: F401
    except Exception as err:
        problems.append(f"rclpy cannot be imported ({type(err).__name__}: {err}); run `make setup`")
    try:
        import surgery_r1_interfaces.srv  # noqa: F401
    except Exception as err:
        problems.append(f"surgery_r1_interfaces is not installed ({type(err).__name__}); run `make setup`")
    if problems:
        raise RuntimeError("; ".join(problems))


def _print_answer(q) -> None:
    from surgery_r1_ros.boxes import iou

    print(f"\n[t={q.t:5.2f} s] Q: {q.question}", flush=False)
    if not q.success:
        print(f"  no answer: {q.error}")
        print(f"  truth: {q.truth}  box {_box(q.truth_box)}", flush=True)
        return
    mark = "correct" if q.correct else "wrong"
    print(f"  answer:    {q.answer}   (truth: {q.truth}, {mark})")
    truth = q.truth_box_in_answer_pixels()
    score = f", IoU {iou(truth, tuple(q.box)):.2f}" if (q.box is not None and truth is not None) else ""
    print(f"  box:       {_box(q.box)}   (truth {_box(q.truth_box)}{score})")
    if q.reasoning:
        print(f"  reasoning: {q.reasoning}")
        print(f"  coherent:  {'yes' if q.coherent else 'no: the reasoning places it elsewhere than the box'}")
    print(f"  latency:   {q.latency_ms:.0f} ms in the node ({q.round_trip_ms:.0f} ms round trip)", flush=True)


def _box(box) -> str:
    return "none" if box is None else "[" + ", ".join(f"{v:.0f}" for v in box) + "]"


def _child_pids() -> list[int]:
    """Live (non-zombie) processes whose parent is this process."""
    me, found = os.getpid(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == me and fields[0] != "Z":
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def run_demo(options: DemoOptions | None = None) -> DemoResult:
    """Run the demo; prints as it goes and returns the report and what (if anything) was left behind."""
    from surgery_r1_ros.bag.ros_env import leftover_shm, shm_snapshot
    from surgery_r1_ros.bag.synth import BagSynthOptions, synth_bag
    from surgery_r1_ros.bag_eval import EvalOptions, run_eval

    options = options or DemoOptions()
    started = time.monotonic()
    preflight()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("frames", "bag", "logs"):
        shutil.rmtree(out / stale, ignore_errors=True)
    shm_before = shm_snapshot()
    children_before = set(_child_pids())  # e.g. a multiprocessing resource tracker of the caller
    workdir = Path(tempfile.mkdtemp(prefix="surgery_r1_demo_"))
    try:
        bag = workdir / "bag"
        print(f"== 1/4 writing a {options.seconds:g} s synthetic stereo bag at {options.size[0]}x{options.size[1]}")
        made = synth_bag(
            bag,
            BagSynthOptions(seconds=options.seconds, seed=options.seed, size=options.size, storage=options.storage),
        )
        print(made.summary())
        print(
            f"\n== 2/4 starting surgery_r1_node ({options.model or 'built-in model'}) on a private DDS domain "
            "(shared memory only) and waiting for ~/ask"
        )
        asked = options.questions or made.question_count
        print(f"== 3/4 replaying the bag and asking {asked} questions at their stamps")
        result = run_eval(
            bag,
            out,
            EvalOptions(
                node="start",
                model=options.model,
                pace="pause",
                reasoning=options.reasoning,
                max_questions=options.questions,
                sheet=max(asked, 1),
                frames_dir=out / "frames",
                frames_limit=asked,
                startup_timeout_s=options.startup_timeout_s,
                timeout_s=options.timeout_s,
                on_answer=_print_answer,
            ),
        )
        if options.keep_bag:
            shutil.copytree(bag, out / "bag")
            shutil.copy2(made.questions, out / "bag.questions.jsonl")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print("\n== 4/4 report")
    print(result.report.summary())
    for path in result.paths.values():
        print(f"  wrote {path}")
    if result.node_log is not None:
        print(f"  node log: {result.node_log}")

    leftovers = [f"process {pid} still running" for pid in _child_pids() if pid not in children_before]
    leftovers += [f"/dev/shm/{name} left behind" for name in leftover_shm(shm_before)]
    elapsed = time.monotonic() - started
    if leftovers:
        print("cleanup: NOT clean: " + "; ".join(leftovers), file=sys.stderr)
    else:
        print("cleanup: the node and every child process stopped; no Fast DDS shared-memory files left")
    budget = "within" if elapsed <= BUDGET_S else "OVER"
    print(f"demo finished in {elapsed:.1f} s ({budget} the {BUDGET_S / 60:.0f}-minute budget)")
    return DemoResult(out, result.report, result.paths, elapsed, leftovers)
