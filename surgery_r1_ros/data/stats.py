"""Pictures and counts of a VQLA dataset: answer counts, an answer histogram and a contact sheet.

``surgery-r1 data check`` prints :func:`format_counts`; ``surgery-r1 data stats`` also writes
``answers.png`` (:func:`write_answer_histogram`) and ``contact_sheet.png`` (:func:`write_contact_sheet`:
frames spread over the dataset with every labelled box and its answers drawn on it).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from surgery_r1_ros.data.vqla import Frame, VQLADataset
from surgery_r1_ros.vocab import ANSWERS, INSTRUMENTS, ORGANS, QUADRANTS, STATES, QuestionKind

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (("organ", ORGANS), ("state", STATES), ("quadrant", QUADRANTS))
GROUP_COLORS = {"organ": "#8c2d3c", "state": "#3b6fb6", "quadrant": "#d08a1e"}

# One colour per instrument on the contact sheet (BGR for cv2), and one for the organ.
INSTRUMENT_BGR: dict[str, tuple[int, int, int]] = dict(
    zip(
        INSTRUMENTS,
        [(255, 140, 40), (40, 220, 255), (80, 230, 80), (30, 130, 255), (255, 255, 255), (200, 200, 200),
         (230, 80, 220), (230, 220, 60)],
        strict=True,
    )
)  # fmt: skip
ORGAN_BGR = (60, 60, 235)
TILE = (640, 512)  # contact sheet tile size (width, height)


def count_answers(dataset: VQLADataset) -> Counter:
    """How often each answer occurs in the dataset's QA pairs."""
    return Counter(qa.answer for _, qa in dataset.qa_pairs())


def format_counts(counter: Counter) -> str:
    """A table of answer counts grouped into organ / state / quadrant, with shares and totals."""
    total = sum(counter.values())
    width = max(len(a) for a in ANSWERS) + 2
    lines = [f"{'answer':<{width}}{'count':>8}{'share':>9}"]
    for group, answers in GROUPS:
        group_total = sum(counter.get(a, 0) for a in answers)
        lines.append(f"{group} ({group_total} QA pairs, {_pct(group_total, total)} of all)")
        for answer in answers:
            n = counter.get(answer, 0)
            lines.append(f"  {answer:<{width - 2}}{n:>8}{_pct(n, group_total):>9}")
    unknown = {a: n for a, n in counter.items() if a not in ANSWERS}
    if unknown:
        lines.append(f"not in the vocabulary ({sum(unknown.values())})")
        lines.extend(f"  {a:<{width - 2}}{n:>8}" for a, n in sorted(unknown.items()))
    missing = [a for a in ANSWERS if counter.get(a, 0) == 0]
    lines.append(f"{'total':<{width}}{total:>8}")
    if missing and total:
        lines.append(f"never answered: {', '.join(missing)}")
    return "\n".join(lines)


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def write_answer_histogram(dataset: VQLADataset, path: str | Path) -> Path:
    """Bar chart (PNG) of how often each of the 18 answers occurs, coloured by group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = count_answers(dataset)
    labels, values, colors = [], [], []
    for group, answers in GROUPS:
        for answer in answers:
            labels.append(answer)
            values.append(counts.get(answer, 0))
            colors.append(GROUP_COLORS[group])
    fig = Figure(figsize=(10, 7), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, labels)
    top = max(values) if any(values) else 1
    for yi, v in zip(y, values, strict=True):
        ax.text(v + top * 0.01, yi, str(v), va="center", fontsize=9)
    ax.set_xlim(0, top * 1.12)
    ax.set_xlabel("QA pairs")
    handles = [ax.bar(0, 0, color=GROUP_COLORS[g], label=g) for g, _ in GROUPS]
    ax.legend(handles=handles, loc="lower right")
    name = dataset.root.name or str(dataset.root)
    ax.set_title(f"{name} [{dataset.split}]: {len(dataset.frames)} frames, {len(dataset)} QA pairs")
    fig.tight_layout()
    fig.savefig(path)
    return path


def pick_frames(dataset: VQLADataset, count: int) -> list[Frame]:
    """``count`` frames spread evenly over the dataset (first and last included), in order."""
    n = len(dataset.frames)
    if n == 0 or count <= 0:
        return []
    idx = sorted({int(i) for i in np.linspace(0, n - 1, min(count, n)).round()})
    return [dataset.frames[i] for i in idx]


def _label(img: np.ndarray, text: str, org: tuple[int, int], color, scale: float = 0.5) -> int:
    """Text on a dark plate, kept inside the image; returns the plate's height."""
    font, thick = cv2.FONT_HERSHEY_SIMPLEX, 1
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    h, w = img.shape[:2]
    x = min(max(0, org[0]), max(0, w - tw - 6))
    y = min(max(th + base + 4, org[1]), h)
    cv2.rectangle(img, (x, y - th - base - 4), (x + tw + 6, y), (20, 20, 20), -1)
    cv2.putText(img, text, (x + 3, y - base - 2), font, scale, color, thick, cv2.LINE_AA)
    return th + base + 4


def _draw_frame(frame: Frame) -> np.ndarray:
    tw, th = TILE
    img = cv2.imread(str(frame.image_path), cv2.IMREAD_COLOR)
    tile = np.full((th, tw, 3), 30, np.uint8)
    if img is None:
        _label(tile, f"cannot read {frame.image_path.name}", (10, th // 2), (0, 0, 255))
        return tile
    fh, fw = img.shape[:2]
    s = min(tw / fw, th / fh)
    nw, nh = max(1, round(fw * s)), max(1, round(fh * s))
    ox, oy = (tw - nw) // 2, (th - nh) // 2
    tile[oy : oy + nh, ox : ox + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)

    # one box per (subject, box), listing all the answers about it
    groups: dict[tuple[str, tuple], list[str]] = {}
    for qa in frame.qas:
        subject = qa.instrument if qa.kind is not QuestionKind.ORGAN else "organ"
        groups.setdefault((subject or "?", qa.box), []).append(qa.answer)
    taken: list[tuple[int, int]] = []
    for (subject, box), answers in sorted(groups.items(), key=lambda kv: kv[0][0] != "organ"):
        color = ORGAN_BGR if subject == "organ" else INSTRUMENT_BGR.get(subject, (255, 255, 255))
        x1, y1 = round(box[0] * s) + ox, round(box[1] * s) + oy
        x2, y2 = round(box[2] * s) + ox, round(box[3] * s) + oy
        cv2.rectangle(tile, (x1, y1), (x2, y2), color, 2 if subject != "organ" else 1, cv2.LINE_AA)
        text = ", ".join(answers) if subject == "organ" else f"{subject}: {' | '.join(answers)}"
        org = (x1 + 2, y1 + 22)
        while any(abs(org[1] - y) < 20 and abs(org[0] - x) < 200 for x, y in taken):
            org = (org[0], org[1] + 22)  # don't stack labels on top of each other
        taken.append(org)
        _label(tile, text, org, color)
    _label(tile, f"{frame.sequence}/{frame.frame_id}  {fw}x{fh}", (0, th), (255, 255, 255), 0.45)
    return tile


def write_contact_sheet(dataset: VQLADataset, path: str | Path, frames: int = 16) -> Path:
    """A grid of ``frames`` frames spread over the dataset, each box drawn with its answers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chosen = pick_frames(dataset, frames)
    if not chosen:
        raise ValueError(f"{dataset.root}: no frames to put on a contact sheet")
    cols = math.ceil(math.sqrt(len(chosen)))
    rows = math.ceil(len(chosen) / cols)
    tw, th = TILE
    gap = 4
    sheet = np.full((rows * (th + gap) + gap, cols * (tw + gap) + gap, 3), 12, np.uint8)
    for k, frame in enumerate(chosen):
        r, c = divmod(k, cols)
        y, x = gap + r * (th + gap), gap + c * (tw + gap)
        sheet[y : y + th, x : x + tw] = _draw_frame(frame)
    if not cv2.imwrite(str(path), sheet, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise RuntimeError(f"could not write {path}")
    return path
