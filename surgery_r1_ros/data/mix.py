"""The Surgery-R1 training mix: Visual-QA, Grounding-QA and chain-of-thought records.

From any VQLA-format dataset we write, for every question, one record of each kind the paper trains
on: ``vqa`` (question -> answer), ``grounding`` (question -> answer + box) and ``cot``
(question -> reasoning + answer + box). The reasoning is written from the frame's ground truth: what
is visible and where, which cue shows the state, why the box is where it is, in varied wording so a
model cannot memorise one sentence. Every position it states agrees with the box (checked with the
shared coherence check), because that is what the coherence reward later asks of the model.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from surgery_r1_ros.boxes import Box, Size, normalized_center, quadrant_of
from surgery_r1_ros.coherence import check_coherence, describe_position
from surgery_r1_ros.data.cues import INSTRUMENT_LOOKS, ORGAN_CUES, STATE_CUES
from surgery_r1_ros.data.vqla import QA, Frame, VQLADataset
from surgery_r1_ros.vocab import QuestionKind, instrument_phrase, state_phrase

KINDS = ("vqa", "grounding", "cot")


@dataclass(frozen=True)
class InstrumentView:
    """What the labels of one frame say about one instrument."""

    name: str
    box: Box
    state: str | None


def _instrument_views(frame: Frame) -> dict[str, InstrumentView]:
    views: dict[str, InstrumentView] = {}
    for qa in frame.qas:
        if qa.instrument is None:
            continue
        old = views.get(qa.instrument)
        state = qa.answer if qa.kind is QuestionKind.STATE else (old.state if old else None)
        views[qa.instrument] = InstrumentView(qa.instrument, qa.box, state)
    return views


def _where(box: Box, size: Size, rng: random.Random) -> str:
    """A position phrase for the box, worded one of several ways."""
    position = describe_position(box, size)
    if position == "centre":
        return rng.choice(("the centre of the view", "the middle of the image", "the central area"))
    vertical, horizontal = position.split()
    top = "top" if vertical == "upper" else "bottom"
    return rng.choice(
        (
            f"the {vertical} {horizontal} of the view",
            f"the {top} {horizontal} area",
            f"the {horizontal}-{top} part of the image",
            f"the {vertical} {horizontal} corner region",
        )
    )


def _organ_sentence(frame: Frame, rng: random.Random) -> str:
    organ_qa = next((qa for qa in frame.qas if qa.kind is QuestionKind.ORGAN), None)
    if organ_qa is None:
        return rng.choice(("The view shows the operative field.", "This is an endoscopic view of the surgical site."))
    cue = rng.choice(ORGAN_CUES.get(organ_qa.answer, (f"the {organ_qa.answer}",)))
    return rng.choice(
        (
            f"The view shows {cue}, filling {_where(organ_qa.box, frame.size, rng)}.",
            f"Under the instruments lies {cue}, mostly in {_where(organ_qa.box, frame.size, rng)}.",
        )
    )


def _other_sentence(view: InstrumentView, size: Size, rng: random.Random) -> str:
    name = instrument_phrase(view.name)
    return rng.choice(
        (
            f"A {name} is also visible in {_where(view.box, size, rng)}.",
            f"There is a {name} in {_where(view.box, size, rng)}.",
            f"The {name} sits in {_where(view.box, size, rng)}.",
        )
    )


def _subject_sentences(qa: QA, view: InstrumentView, size: Size, rng: random.Random) -> list[str]:
    name = instrument_phrase(view.name)
    look = rng.choice(INSTRUMENT_LOOKS.get(view.name, ("its typical shape",)))
    sentences = [
        rng.choice(
            (
                f"The {name}, recognisable by {look}, is in {_where(view.box, size, rng)}.",
                f"I find the {name} by {look}; it lies in {_where(view.box, size, rng)}.",
                f"The asked-about {name} shows {look} and is located in {_where(view.box, size, rng)}.",
            )
        )
    ]
    if qa.kind is QuestionKind.STATE:
        cue = rng.choice(STATE_CUES.get(qa.answer, ("its appearance matches this action",)))
        label = state_phrase(qa.answer)
        # The state comes before its cue: written cue-first, the built-in model's reasoning wrote the commonest
        # state's cue and then that state (right 0.237; a linear probe read the frame's state there at 0.362, at
        # the answer position at 0.591); state-first, the probe reads 0.611 there and the state named is right 0.575.
        sentences.append(
            rng.choice(
                (
                    f"Its state is {label}: {cue}.",
                    f"It is performing {label}: {cue}.",
                    f"Its state is {label}, since {cue}.",
                )
            )
        )
    else:
        cx, cy = normalized_center(view.box, size)
        sentences.append(
            rng.choice(
                (
                    f"Its box centre lies {'left' if cx < 0.5 else 'right'} of the vertical midline and "
                    f"{'above' if cy < 0.5 else 'below'} the horizontal one, so it is {qa.answer}.",
                    f"Splitting the image into four quadrants, its box falls in the {qa.answer} quadrant.",
                )
            )
        )
    sentences.append(
        rng.choice(
            (
                "The box encloses its visible shaft and tip.",
                "I place the box around the whole visible part of the instrument.",
                "The box covers it from the frame border to the tip.",
            )
        )
    )
    return sentences


def _organ_answer_sentences(qa: QA, size: Size, rng: random.Random) -> list[str]:
    cue = rng.choice(ORGAN_CUES.get(qa.answer, (f"the {qa.answer}",)))
    return [
        rng.choice(
            (
                f"The tissue being operated on is {cue}, so the organ is the {qa.answer}.",
                f"Its colour and shape, {cue}, identify the {qa.answer}.",
            )
        ),
        f"The box surrounds the organ, which fills {_where(qa.box, size, rng)}.",
    ]


def write_reasoning(frame: Frame, qa: QA, rng: random.Random) -> str:
    """Chain-of-thought text for one question, written from the frame's labels."""
    views = _instrument_views(frame)
    if qa.kind is QuestionKind.ORGAN:
        # Organ sentences come before any instrument is named so their positions refer to the organ.
        sentences = _organ_answer_sentences(qa, frame.size, rng)
        sentences += [_other_sentence(v, frame.size, rng) for v in views.values()]
    else:
        others = [v for name, v in views.items() if name != qa.instrument]
        rng.shuffle(others)
        sentences = [_organ_sentence(frame, rng)]
        if others:
            sentences.append(f"I can see {len(others) + 1} instruments.")
        sentences += [_other_sentence(v, frame.size, rng) for v in others]
        subject = views.get(qa.instrument, InstrumentView(qa.instrument or "", qa.box, None))
        sentences += _subject_sentences(qa, subject, frame.size, rng)
    return " ".join(sentences)


def subject_sentences_start(reasoning: str, subject: str | None) -> int:
    """Where the sentences about the question's subject begin in ``reasoning``: the start of the first sentence
    that names the instrument ``subject`` (the space before it, or 0), so the reasoning before it is about the
    organ and the other instruments (``write_reasoning`` puts the subject's sentences last). ``len(reasoning)``
    when no instrument is asked about (organ questions) or the reasoning never names it."""
    named = reasoning.find(instrument_phrase(subject)) if subject else -1
    if named < 0:
        return len(reasoning)
    return reasoning.rfind(". ", 0, named) + 1


def build_mix(dataset: VQLADataset, seed: int = 0) -> list[dict]:
    """One record of each kind per question, deterministic for a seed."""
    records: list[dict] = []
    for index, (frame, qa) in enumerate(dataset.qa_pairs()):
        rng = random.Random(f"{seed}:{index}")
        reasoning = write_reasoning(frame, qa, rng)
        result = check_coherence(reasoning, qa.box, frame.size, qa.instrument)
        if not result.coherent:  # a bug in the writer, never in the data: fail loudly
            raise AssertionError(f"incoherent reasoning for {frame.image_path} {qa.question!r}: {reasoning}")
        base = {
            "image": str(frame.image_path),
            "image_size": list(frame.size),
            "sequence": frame.sequence,
            "frame": frame.frame_id,
            "question": qa.question,
            "answer": qa.answer,
            "subject": qa.instrument,
            "quadrant": quadrant_of(qa.box, frame.size),
        }
        records.append({**base, "kind": "vqa", "box": None, "reasoning": None})
        records.append({**base, "kind": "grounding", "box": list(qa.box), "reasoning": None})
        records.append({**base, "kind": "cot", "box": list(qa.box), "reasoning": reasoning})
    return records


def write_mix(records: Iterable[dict], path: str | Path) -> Path:
    """Write records as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return path


def read_mix(path: str | Path) -> list[dict]:
    """Read a mix file, naming the line of any record that is not valid JSON or lacks a field."""
    path = Path(path)
    records = []
    required = {"kind", "image", "image_size", "question", "answer", "box", "reasoning", "subject"}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
        missing = required - set(record)
        if missing:
            raise ValueError(f"{path}:{number}: record lacks {', '.join(sorted(missing))}; regenerate with data mix")
        records.append(record)
    return records


def format_mix_counts(records: list[dict]) -> str:
    """Counts per record kind and per answer."""
    kinds = Counter(r["kind"] for r in records)
    answers = Counter(r["answer"] for r in records if r["kind"] == "vqa")
    lines = ["records per kind:"] + [f"  {k:<10} {kinds.get(k, 0):>7}" for k in KINDS]
    lines += ["questions per answer:"] + [f"  {a:<22} {n:>7}" for a, n in answers.most_common()]
    return "\n".join(lines)
