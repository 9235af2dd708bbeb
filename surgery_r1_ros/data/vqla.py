"""Read Surgical-VQLA datasets in the EndoVis-18/17-VQLA layout (real or synthetic).

EndoVis-18-VQLA: ``seq_N/left_frames/frameNNN.png`` with ``seq_N/vqla/label/frameNNN.txt``.
EndoVis-17-VQLA: ``left_frames/*.jpg`` with ``vqla/label/*.txt`` (one sequence, an external test set).
Each label line is ``question|answer|x1,y1,x2,y2`` with a pixel box. A ``splits.json``
(``{"train": ["seq_2", ...], "test": [...]}``) at the root overrides the published split; our
synthetic generator writes one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from surgery_r1_ros.boxes import Box, Size
from surgery_r1_ros.vocab import QuestionKind, answer_kind, canonical_answer, parse_question

log = logging.getLogger(__name__)

ENDOVIS18_TRAIN = (2, 3, 4, 6, 7, 9, 10, 11, 12, 14, 15)
ENDOVIS18_TEST = (1, 5, 16)
SPLITS = ("train", "test", "all")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS_FILE = "splits.json"


class DatasetError(ValueError):
    """A dataset problem, with the file (and line) it was found in and what to do about it."""

    def __init__(self, path: Path, message: str, line: int | None = None) -> None:
        self.path, self.line, self.reason = path, line, message
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class QA:
    """One question about a frame, its answer and the pixel box the answer is about."""

    question: str
    answer: str
    box: Box
    kind: QuestionKind
    instrument: str | None


@dataclass(frozen=True)
class Frame:
    """One endoscope frame and its questions."""

    sequence: str
    frame_id: str
    image_path: Path
    size: Size
    qas: tuple[QA, ...]


@dataclass
class VQLADataset:
    """Frames of one split, plus every label line that was skipped and why (``skip_bad``)."""

    root: Path
    split: str
    frames: list[Frame]
    skipped: list[DatasetError] = field(default_factory=list)

    def qa_pairs(self) -> Iterator[tuple[Frame, QA]]:
        for frame in self.frames:
            for qa in frame.qas:
                yield frame, qa

    def __len__(self) -> int:
        return sum(len(f.qas) for f in self.frames)


def parse_label_line(text: str, size: Size, path: Path, line: int) -> QA:
    """Parse and validate ``question|answer|x1,y1,x2,y2`` against the frame size."""
    parts = text.split("|")
    if len(parts) != 3:
        raise DatasetError(path, f"expected 'question|answer|x1,y1,x2,y2', got {len(parts)} field(s): {text!r}", line)
    question, raw_answer, raw_box = (p.strip() for p in parts)
    answer = canonical_answer(raw_answer)
    if answer is None:
        raise DatasetError(path, f"unknown answer {raw_answer!r} (not one of the 18 Surgical-VQLA labels)", line)
    try:
        kind, instrument = parse_question(question)
    except ValueError as err:
        raise DatasetError(path, str(err), line) from None
    if answer_kind(answer) is not kind:
        raise DatasetError(path, f"answer {answer!r} does not fit question {question!r}", line)
    try:
        x1, y1, x2, y2 = (float(v) for v in raw_box.split(","))
    except ValueError:
        raise DatasetError(path, f"box {raw_box!r} is not four comma-separated numbers", line) from None
    if x2 < x1 or y2 < y1:
        raise DatasetError(path, f"box {raw_box!r} is inverted (need x1 <= x2 and y1 <= y2)", line)
    w, h = size
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise DatasetError(path, f"box {raw_box!r} lies outside the {w}x{h} frame", line)
    return QA(question, answer, (x1, y1, x2, y2), kind, instrument)


def _find_frame(frames_dir: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = frames_dir / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _image_size(path: Path) -> Size:
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except OSError as err:
        raise DatasetError(path, f"cannot read image ({err}); replace or remove the frame") from None


def load_sequence(seq_dir: Path, skip_bad: bool = False, skipped: list[DatasetError] | None = None) -> list[Frame]:
    """Frames of one sequence folder (``left_frames/`` + ``vqla/label/``)."""
    label_dir, frames_dir = seq_dir / "vqla" / "label", seq_dir / "left_frames"
    if not label_dir.is_dir():
        raise DatasetError(seq_dir, "no vqla/label folder: not an EndoVis-VQLA sequence")
    frames: list[Frame] = []
    for label_path in sorted(label_dir.glob("*.txt")):
        try:
            frames.append(_load_frame(seq_dir.name, label_path, frames_dir, skip_bad, skipped))
        except DatasetError as err:
            if not skip_bad:
                raise
            _record(skipped, err)
    return frames


def _load_frame(
    sequence: str, label_path: Path, frames_dir: Path, skip_bad: bool, skipped: list[DatasetError] | None
) -> Frame:
    image_path = _find_frame(frames_dir, label_path.stem)
    if image_path is None:
        raise DatasetError(label_path, f"missing frame {label_path.stem}.png/.jpg in {frames_dir}")
    size = _image_size(image_path)
    qas: list[QA] = []
    for number, text in enumerate(label_path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            qas.append(parse_label_line(text, size, label_path, number))
        except DatasetError as err:
            if not skip_bad:
                raise
            _record(skipped, err)
    return Frame(sequence, label_path.stem, image_path, size, tuple(qas))


def _record(skipped: list[DatasetError] | None, err: DatasetError) -> None:
    log.warning("skipped %s", err)
    if skipped is not None:
        skipped.append(err)


def _sequence_number(name: str) -> int | None:
    suffix = name.removeprefix("seq_")
    return int(suffix) if suffix != name and suffix.isdigit() else None


def sequence_dirs(root: Path, split: str) -> list[Path]:
    """The sequence folders of ``split`` under ``root``, by splits.json or the published split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise DatasetError(root, "dataset folder does not exist")
    if (root / "vqla" / "label").is_dir():  # EndoVis-17 layout: one sequence, a test set
        if split == "train":
            raise DatasetError(root, "an EndoVis-17-VQLA folder is a test set; use --split test or all")
        return [root]
    seqs = sorted((p for p in root.iterdir() if p.is_dir() and (p / "vqla").is_dir()), key=lambda p: p.name)
    if not seqs:
        raise DatasetError(root, "no seq_*/vqla or vqla/label folders: not an EndoVis-VQLA dataset")
    if split == "all":
        return seqs
    splits_file = root / SPLITS_FILE
    if splits_file.is_file():
        try:
            wanted = set(json.loads(splits_file.read_text())[split])
        except (ValueError, KeyError, TypeError) as err:
            raise DatasetError(splits_file, f"expected {{'train': [...], 'test': [...]}} ({err})") from None
        return [p for p in seqs if p.name in wanted]
    published = ENDOVIS18_TRAIN if split == "train" else ENDOVIS18_TEST
    return [p for p in seqs if _sequence_number(p.name) in published]


def load_vqla(root: str | Path, split: str = "all", skip_bad: bool = False) -> VQLADataset:
    """Load a split. Bad label lines raise DatasetError unless ``skip_bad``, which skips and records them."""
    root = Path(root)
    skipped: list[DatasetError] = []
    frames: list[Frame] = []
    for seq_dir in sequence_dirs(root, split):
        frames.extend(load_sequence(seq_dir, skip_bad, skipped))
    return VQLADataset(root, split, frames, skipped)
