"""Write synthetic sequences to disk in exactly the EndoVis-18-VQLA layout, plus ``splits.json``."""

from __future__ import annotations

import json
import multiprocessing
import resource
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from surgery_r1_ros.data.synth.png import encoder_name, write_png
from surgery_r1_ros.data.synth.scene import DEFAULT_SIZE, DIFFICULTIES, render_sequence

MARKER = "synth.json"  # marks a folder as this generator's output (so it may be overwritten)
GENERATOR = "surgery_r1_ros.data.synth"
FORMAT_VERSION = 2  # 2: dense ground truth beside the labels
# Sidecar beside vqla/label/: frameNNN.png (FrameTruth.mask) and frameNNN.json (FrameTruth.dense_record()).
DENSE_DIR = "dense"


@dataclass(frozen=True)
class SynthOptions:
    """What to generate; ``size`` is (width, height).

    Each sequence is a continuous 30 Hz video of which every ``frame_step``-th frame is saved
    (default 6: 5 frames per second of video, so states change every few saved frames).
    """

    sequences: int
    frames_per_sequence: int
    seed: int = 0
    size: tuple[int, int] = DEFAULT_SIZE
    test_fraction: float = 0.25
    difficulty: str = "normal"
    frame_step: int = 6

    def validate(self) -> None:
        if self.sequences < 1:
            raise ValueError(f"sequences must be >= 1, got {self.sequences}")
        if self.frames_per_sequence < 1:
            raise ValueError(f"frames_per_sequence must be >= 1, got {self.frames_per_sequence}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.frame_step < 1:
            raise ValueError(f"frame_step must be >= 1, got {self.frame_step}")
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty {self.difficulty!r}: use one of {', '.join(DIFFICULTIES)}")
        w, h = self.size
        if not (64 <= w <= 8192 and 64 <= h <= 8192):
            raise ValueError(f"size {w}x{h}: width and height must be between 64 and 8192")


@dataclass
class SynthReport:
    """What :func:`generate_dataset` wrote and how fast."""

    out: Path
    frames: int
    qa_pairs: int
    seconds: float
    train: list[str]
    test: list[str]
    answers: Counter = field(default_factory=Counter)
    cpu_seconds: float = 0.0  # CPU time of this process and its workers (rendering + PNG writing)
    png_encoder: str = ""

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")

    @property
    def frames_per_cpu_second(self) -> float:
        """Throughput per core: independent of other load on the machine."""
        return self.frames / self.cpu_seconds if self.cpu_seconds > 0 else float("inf")

    def summary(self) -> str:
        return (
            f"wrote {self.frames} frames, {self.qa_pairs} QA pairs to {self.out} in {self.seconds:.1f} s: "
            f"{self.frames_per_second:.1f} frames/s ({self.frames_per_cpu_second:.1f} frames per CPU-second, "
            f"PNG via {self.png_encoder}); {len(self.train)} train / {len(self.test)} test sequences "
            f"(names in {self.out / 'splits.json'})"
        )


def sequence_seed(seed: int, index: int) -> int:
    """The render seed of sequence ``index`` (1-based) of a dataset generated with ``seed``."""
    return int(np.random.SeedSequence([abs(int(seed)), int(seed < 0), int(index)]).generate_state(1)[0])


def split_sequences(names: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Train/test partition: a ``test_fraction`` share in test, at least one when there are several."""
    n = len(names)
    n_test = round(test_fraction * n)
    n_test = min(max(1, n_test), n - 1) if n > 1 and test_fraction > 0 else 0
    order = np.random.default_rng(sequence_seed(seed, 0)).permutation(n)
    test = {names[int(i)] for i in order[:n_test]}
    return [s for s in names if s not in test], [s for s in names if s in test]


def _prepare(out: Path) -> None:
    """Refuse a non-empty folder that is not our own output; clear our previous output."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        marker = out / MARKER
        try:
            ours = json.loads(marker.read_text()).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ValueError(
                f"{out} is not empty and is not a synthetic dataset written by this generator (no {MARKER}); "
                "choose a new or empty folder"
            )
        for child in out.iterdir():
            if child.is_dir() and child.name.startswith("seq_"):
                shutil.rmtree(child)
        for name in ("splits.json", MARKER):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_marker(out: Path, options: SynthOptions, complete: bool, **extra) -> None:
    info = {"generator": GENERATOR, "format": FORMAT_VERSION, "complete": complete, "options": asdict(options)}
    info.update(extra)
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _write_sequence(job: tuple[Path, str, int, SynthOptions, bool]) -> tuple[int, int, Counter]:
    out, name, seed, options, progress = job
    cv2.setNumThreads(1)
    frames_dir = out / name / "left_frames"
    label_dir = out / name / "vqla" / "label"
    dense_dir = out / name / "vqla" / DENSE_DIR
    for folder in (frames_dir, label_dir, dense_dir):
        folder.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(options.frames_per_sequence - 1)))
    qa_pairs, answers = 0, Counter()
    stream = render_sequence(
        seed, options.frames_per_sequence, options.size, options.difficulty, continuous=True, step=options.frame_step
    )
    for k, (frame, truth) in enumerate(stream):
        stem = f"frame{k:0{digits}d}"
        write_png(frames_dir / f"{stem}.png", frame)
        lines = truth.qa_lines()
        (label_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        cv2.imwrite(str(dense_dir / f"{stem}.png"), truth.mask)
        (dense_dir / f"{stem}.json").write_text(json.dumps(truth.dense_record()) + "\n", encoding="utf-8")
        qa_pairs += len(lines)
        answers.update(a for _, a, _ in truth.qas())
        if progress is not None:
            progress.update(1)
    return options.frames_per_sequence, qa_pairs, answers


def generate_dataset(out: str | Path, options: SynthOptions, workers: int = 1) -> SynthReport:
    """Render ``options.sequences`` continuous sequences into ``out`` (EndoVis-18-VQLA layout).

    Writes ``seq_N/left_frames/frameNNN.png``, ``seq_N/vqla/label/frameNNN.txt``, the dense ground truth
    ``seq_N/vqla/dense/frameNNN.png`` + ``.json`` (a sidecar real EndoVis lacks; loaders ignore it), ``splits.json``
    and ``synth.json`` (the options; it lets a later run overwrite this folder). The output depends
    only on the options, not on ``workers``.
    """
    options.validate()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    _prepare(out)
    _write_marker(out, options, complete=False)
    names = [f"seq_{i}" for i in range(1, options.sequences + 1)]
    seeds = [sequence_seed(options.seed, i) for i in range(1, options.sequences + 1)]
    total = options.sequences * options.frames_per_sequence
    start, cpu_start = time.perf_counter(), _cpu_time()
    frames = qa_pairs = 0
    answers: Counter = Counter()
    with tqdm(total=total, unit="frame", desc=f"synth {out.name}", leave=False, disable=None) as bar:
        if workers == 1 or options.sequences == 1:
            for name, seed in zip(names, seeds, strict=True):
                f, q, a = _write_sequence((out, name, seed, options, bar))
                frames, qa_pairs = frames + f, qa_pairs + q
                answers.update(a)
        else:
            jobs = [(out, name, seed, options, None) for name, seed in zip(names, seeds, strict=True)]
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, options.sequences)) as pool:
                for f, q, a in pool.imap_unordered(_write_sequence, jobs):
                    frames, qa_pairs = frames + f, qa_pairs + q
                    answers.update(a)
                    bar.update(f)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_time() - cpu_start
    train, test = split_sequences(names, options.test_fraction, options.seed)
    (out / "splits.json").write_text(json.dumps({"train": train, "test": test}, indent=2) + "\n")
    _write_marker(out, options, complete=True, frames=frames, qa_pairs=qa_pairs)
    return SynthReport(out, frames, qa_pairs, seconds, train, test, answers, cpu_seconds, encoder_name())


def _cpu_time() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
