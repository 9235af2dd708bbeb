"""The bag evaluation report: the shared scores over the asked questions, JSON + Markdown + a PNG sheet. ROS-free.

Scores come from ``scoring.score_answers``, the function ``surgery-r1 eval`` reports with, so both give the
same figures for the same answers (rules: ``scoring.DEFINITIONS``, written into every report). What only a
run against the node has:

- a question the node did not answer (refusal, timeout, node gone) counts as no answer: wrong, no box;
- questions outside the bag's time range, or with no image near their stamp, are not asked: they are
  counted and listed, not scored;
- latency p50/p95/max of the node's own ``latency_ms`` and of the client's round trip.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from surgery_r1_ros.boxes import Box, scale_box
from surgery_r1_ros.protocol import PromptMode
from surgery_r1_ros.scoring import DEFINITIONS, NONE_LABEL, AnswerRecord, score_answers


@dataclass
class AskedQuestion:
    """One question of the questions file and what became of it."""

    index: int
    question: str
    truth: str
    truth_box: list[float] | None
    image_size: list[int] | None
    stamp_ns: int
    t: float
    subject: str | None = None
    kind: str | None = None
    asked: bool = False
    skipped: str = ""  # why it was not asked (outside the bag, no frame near the stamp)
    success: bool = False
    error: str = ""
    answer: str = ""
    reasoning: str = ""
    box: list[float] | None = None  # x1, y1, x2, y2 pixels of the answered frame
    answered_size: list[int] | None = None
    coherent: bool | None = None
    latency_ms: float | None = None
    inference_ms: float | None = None
    frame_age_ms: float | None = None
    round_trip_ms: float | None = None
    answered_stamp_ns: int | None = None
    attempts: int = 0

    def record(self) -> AnswerRecord:
        """This question and its answer as the shared scoring reads them."""
        size = self.answered_size or self.image_size
        return AnswerRecord(
            truth=self.truth,
            truth_box=self.truth_box_in_answer_pixels(),
            frame_size=(int(size[0]), int(size[1])) if size else (0, 0),
            subject=self.subject,
            answer=self.answer or None,
            box=tuple(self.box) if self.box is not None else None,
            reasoning=self.reasoning or None,
            coherent=bool(self.coherent),
        )

    @property
    def correct(self) -> bool:
        return self.asked and self.record().label == self.truth

    def truth_box_in_answer_pixels(self) -> Box | None:
        """The truth box in the answered frame's pixels (the sidecar may describe another image size)."""
        if self.truth_box is None:
            return None
        box = tuple(float(v) for v in self.truth_box)
        if self.image_size and self.answered_size and list(self.image_size) != list(self.answered_size):
            return scale_box(box, tuple(self.image_size), tuple(self.answered_size))
        return box


@dataclass
class EvalReport:
    """Everything ``bag eval`` measured."""

    bag: str
    questions_file: str
    model: str
    node: str
    pace: str
    reasoning: bool
    questions: list[AskedQuestion]
    frames_played: int = 0
    frames_received: int | None = None  # from the node's /diagnostics (None: not seen)
    frames_republished: int = 0
    play: dict = field(default_factory=dict)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    # -- metrics ---------------------------------------------------------------------------------
    @property
    def mode(self) -> PromptMode:
        return PromptMode.for_request(self.reasoning)

    def asked(self) -> list[AskedQuestion]:
        return [q for q in self.questions if q.asked]

    def metrics(self) -> dict:
        """The shared scores (``scoring.score_answers`` keys, without definitions) plus counts and latency."""
        asked = self.asked()
        scores = score_answers([q.record() for q in asked], self.mode)
        scores.pop("definitions")
        answered = [q for q in asked if q.success]
        latencies = [q.latency_ms for q in answered if q.latency_ms is not None]
        trips = [q.round_trip_ms for q in asked if q.round_trip_ms is not None]
        by_kind = {}
        for kind in sorted({q.kind for q in asked if q.kind}):
            rows = [q for q in asked if q.kind == kind]
            by_kind[kind] = {"questions": len(rows), "accuracy": sum(q.correct for q in rows) / len(rows)}
        return {
            "questions_in_file": len(self.questions),
            "asked": len(asked),
            "answered": len(answered),
            "skipped": dict(Counter(q.skipped for q in self.questions if not q.asked)),
            "errors": dict(Counter(_error_key(q.error) for q in asked if not q.success)),
            **scores,
            "latency_ms": _percentiles(latencies),
            "round_trip_ms": _percentiles(trips),
            "by_kind": by_kind,
            "frames_played": self.frames_played,
            "frames_received": self.frames_received,
            "frames_republished": self.frames_republished,
        }

    # -- output ----------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        return {
            "bag": self.bag,
            "questions_file": self.questions_file,
            "model": self.model,
            "node": self.node,
            "pace": self.pace,
            "reasoning": self.reasoning,
            "wall_s": round(self.wall_s, 3),
            "metrics": _round(self.metrics()),
            "play": self.play,
            "notes": self.notes,
            "definitions": DEFINITIONS,
        }

    def write(self, out: Path, sheet_frames: dict[int, np.ndarray] | None = None, sheet_size: int = 12) -> dict:
        """Write report.json, report.md, answers.jsonl and (with frames) answers.png to ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json", "markdown": out / "report.md", "answers": out / "answers.jsonl"}
        paths["json"].write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        with paths["answers"].open("w") as f:
            for q in self.questions:
                f.write(json.dumps(asdict(q)) + "\n")
        if sheet_frames:
            paths["sheet"] = write_sheet(self.sheet_questions(sheet_size), sheet_frames, out / "answers.png")
        paths["markdown"].write_text(self.markdown(has_sheet="sheet" in paths))
        return paths

    def sheet_questions(self, count: int) -> list[AskedQuestion]:
        """Up to ``count`` asked questions spread over the run (answered ones first), for the PNG sheet."""
        answered = [q for q in self.questions if q.success]
        if len(answered) >= count:
            return spread(answered, count)
        failed = [q for q in self.questions if q.asked and not q.success]
        return sorted(answered + spread(failed, count - len(answered)), key=lambda q: q.index)

    def summary(self) -> str:
        m = self.metrics()
        lines = [
            f"asked {m['asked']} of {m['questions_in_file']} questions, answered {m['answered']} "
            f"({self.pace} pace, reasoning {'on' if self.reasoning else 'off'}) in {self.wall_s:.1f} s",
            f"  accuracy {_fmt(m['accuracy'])}  F-score {_fmt(m['f_score'])}  mIoU {_fmt(m['miou'])}  "
            f"legacy mIoU {_fmt(m['miou_legacy'])}  format {_fmt(m['format_rate'])}  "
            f"coherence {_fmt(m['coherence_rate'])}",
            f"  latency p50 {_fmt(m['latency_ms']['p50'], 1)} ms  p95 {_fmt(m['latency_ms']['p95'], 1)} ms  "
            f"max {_fmt(m['latency_ms']['max'], 1)} ms",
            f"  frames played {m['frames_played']}, received by the node "
            f"{m['frames_received'] if m['frames_received'] is not None else 'unknown'}",
        ]
        if self.reasoning:
            lines.insert(2, f"  reasoning: coherence of checkable claims {_fmt(m['claimed_coherence_rate'])}  "
                         f"names the asked instrument {_fmt(m['subject_rate'])}  names the right state "
                         f"{_fmt(m['state_claim_accuracy'])}  answers the state it names "
                         f"{_fmt(m['state_agreement_rate'])}")  # fmt: skip
        if m["skipped"]:
            lines.append("  not asked: " + ", ".join(f"{n} {why}" for why, n in m["skipped"].items()))
        if m["errors"]:
            lines.append("  failed: " + ", ".join(f"{n} x {why}" for why, n in m["errors"].items()))
        return "\n".join(lines)

    def markdown(self, has_sheet: bool = False) -> str:
        m = self.metrics()
        lat, trip = m["latency_ms"], m["round_trip_ms"]
        rows = [
            ("Questions in file", m["questions_in_file"]),
            ("Asked / answered", f"{m['asked']} / {m['answered']}"),
            ("Accuracy", _fmt(m["accuracy"])),
            ("F-score (macro)", _fmt(m["f_score"])),
            ("mIoU (true IoU)", _fmt(m["miou"])),
            ("Legacy mIoU (published metric)", _fmt(m["miou_legacy"])),
            ("Format rate", _fmt(m["format_rate"])),
            ("Coherence rate", f"{_fmt(m['coherence_rate'])} of {m['n_with_reasoning'] or 0} reasoned answers"),
            ("Coherence of checkable claims", _fmt(m["claimed_coherence_rate"])),
            ("Checkable claims true of the frame (against the true box)", _fmt(m["true_claims_rate"])),
            ("Reasoning names the asked instrument", _fmt(m["subject_rate"])),
            (
                "Reasoning names the right state / the answer is the state it names",
                f"{_fmt(m['state_claim_accuracy'])} / {_fmt(m['state_agreement_rate'])}",
            ),
            (
                "Node latency p50 / p95 / max (ms)",
                f"{_fmt(lat['p50'], 1)} / {_fmt(lat['p95'], 1)} / {_fmt(lat['max'], 1)}",
            ),
            (
                "Round trip p50 / p95 / max (ms)",
                f"{_fmt(trip['p50'], 1)} / {_fmt(trip['p95'], 1)} / {_fmt(trip['max'], 1)}",
            ),
            (
                "Frames played / received by node",
                f"{m['frames_played']} / {m['frames_received'] if m['frames_received'] is not None else 'unknown'}",
            ),
            ("Frames re-sent to hold a question frame", m["frames_republished"]),
        ]
        out = [
            "# Surgery-R1 bag evaluation",
            "",
            f"- bag: `{self.bag}`",
            f"- questions: `{self.questions_file}`",
            f"- model: {self.model}; node: {self.node}; pace: {self.pace}; "
            f"reasoning: {'on' if self.reasoning else 'off'}; wall time {self.wall_s:.1f} s",
            "",
            "| metric | value |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in rows],
            "",
        ]
        if m["by_kind"]:
            out += ["| question kind | asked | accuracy |", "|---|---|---|"]
            out += [f"| {k} | {v['questions']} | {_fmt(v['accuracy'])} |" for k, v in m["by_kind"].items()]
            out.append("")
        if m["skipped"] or m["errors"]:
            out.append("## Not asked or not answered")
            out.append("")
            out += [f"- not asked, {why}: {n}" for why, n in m["skipped"].items()]
            out += [f"- failed, {why}: {n}" for why, n in m["errors"].items()]
            out.append("")
        if self.notes:
            out += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        out += [
            "## Answers",
            "",
            "| t (s) | question | truth | answer | IoU | coherent | latency ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for q in self.questions:
            if not q.asked:
                continue
            iou = _iou(q)
            answer = q.answer if q.success else f"error: {q.error[:60]}"
            out.append(
                f"| {q.t:.3f} | {q.question} | {q.truth} | {answer}{' ✓' if q.correct else ''} | "
                f"{_fmt(iou)} | {'' if q.coherent is None else ('yes' if q.coherent else 'no')} | "
                f"{_fmt(q.latency_ms, 1)} |"
            )
        out += ["", "## Scoring", "", *[f"- `{k}`: {v}" for k, v in DEFINITIONS.items()], ""]
        if has_sheet:
            out += ["![answers: truth green, prediction red](answers.png)", ""]
        return "\n".join(out)


def spread(items: list, count: int) -> list:
    """``count`` items evenly spread over ``items`` (all of them when there are fewer)."""
    if count <= 0 or not items:
        return []
    if len(items) <= count:
        return list(items)
    idx = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def annotate(rgb: np.ndarray, q: AskedQuestion, with_reasoning: bool = False) -> np.ndarray:
    """The answered frame with the truth box (green) and the predicted box (red) and a caption strip."""
    import cv2

    img = np.array(rgb, dtype=np.uint8, copy=True, order="C")
    h, w = img.shape[:2]
    scale = max(0.4, min(w, h) / 900)
    thick = max(1, round(2 * scale))
    truth = q.truth_box_in_answer_pixels()
    if truth is not None:
        x1, y1, x2, y2 = (round(v) for v in truth)
        cv2.rectangle(img, (x1, y1), (x2, y2), (40, 220, 40), thick + 1)
    if q.box is not None:
        x1, y1, x2, y2 = (round(v) for v in q.box)
        cv2.rectangle(img, (x1, y1), (x2, y2), (235, 40, 40), thick + 1)
    lines = [
        f"t={q.t:.2f}s  {q.question}",
        (f"answer: {q.answer or NONE_LABEL}   truth: {q.truth}   " + ("OK" if q.correct else "WRONG"))
        if q.success
        else f"no answer: {q.error[:70]}   truth: {q.truth}",
        f"IoU {_fmt(_iou(q))}   coherent: {'-' if q.coherent is None else q.coherent}   "
        f"latency {_fmt(q.latency_ms, 0)} ms",
    ]
    if with_reasoning and q.reasoning:
        lines += _wrap("reasoning: " + q.reasoning, max(30, int(w / (11 * scale))))[:4]
    line_h = int(24 * scale) + 6
    strip = np.full((line_h * len(lines) + 8, w, 3), 20, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(
            strip,
            line,
            (6, line_h * (i + 1)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.55 * scale * 1.4,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
    return np.vstack([img, strip])


def write_sheet(
    questions: list[AskedQuestion], frames: dict[int, np.ndarray], path: Path, columns: int = 3, tile_width: int = 480
) -> Path:
    """A contact sheet of annotated answers (truth green, prediction red)."""
    import cv2

    tiles = []
    for q in questions:
        rgb = frames.get(q.index)
        if rgb is None:
            continue
        tile = annotate(rgb, q)
        scale = tile_width / tile.shape[1]
        tiles.append(cv2.resize(tile, (tile_width, round(tile.shape[0] * scale)), interpolation=cv2.INTER_AREA))
    if not tiles:
        tiles = [np.full((120, tile_width, 3), 30, np.uint8)]
        cv2.putText(tiles[0], "no answered questions", (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 1)
    tile_h = max(t.shape[0] for t in tiles)
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    sheet = np.full((rows * (tile_h + 6) + 6, columns * (tile_width + 6) + 6, 3), 60, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = 6 + r * (tile_h + 6), 6 + c * (tile_width + 6)
        sheet[y : y + tile.shape[0], x : x + tile_width] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path


def _iou(q: AskedQuestion) -> float | None:
    return q.record().iou() if q.asked else None


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    arr = np.asarray(values, dtype=float)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "max": float(arr.max()),
        "n": len(values),
    }


def _error_key(error: str) -> str:
    text = (error or "unknown error").strip()
    return text.split(":")[0][:80] if len(text) > 80 else text


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _round(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj
