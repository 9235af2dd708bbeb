"""The one label vocabulary of Surgical-VQLA (EndoVis-18/17-VQLA), shared by data, training and runtime."""

from __future__ import annotations

import enum
import re

ORGANS: tuple[str, ...] = ("kidney",)
STATES: tuple[str, ...] = (
    "Idle",
    "Grasping",
    "Retraction",
    "Tissue_Manipulation",
    "Tool_Manipulation",
    "Cutting",
    "Cauterization",
    "Suction",
    "Looping",
    "Suturing",
    "Clipping",
    "Staple",
    "Ultrasound_Sensing",
)
QUADRANTS: tuple[str, ...] = ("left-top", "right-top", "left-bottom", "right-bottom")
ANSWERS: tuple[str, ...] = ORGANS + STATES + QUADRANTS

INSTRUMENTS: tuple[str, ...] = (
    "bipolar_forceps",
    "prograsp_forceps",
    "large_needle_driver",
    "monopolar_curved_scissors",
    "ultrasound_probe",
    "suction",
    "clip_applier",
    "stapler",
)

ORGAN_QUESTION = "What organ is being operated?"
STATE_QUESTION = "What is the state of {instrument}?"
LOCATION_QUESTION = "Where is {instrument} located?"


class QuestionKind(enum.StrEnum):
    """What a Surgical-VQLA question asks about."""

    ORGAN = "organ"
    STATE = "state"
    LOCATION = "location"


_STATE_RE = re.compile(r"^\s*what\s+is\s+the\s+state\s+of\s+(?:the\s+)?(?P<inst>[\w\s-]+?)\s*\??\s*$", re.I)
_LOCATION_RE = re.compile(r"^\s*where\s+is\s+(?:the\s+)?(?P<inst>[\w\s-]+?)\s+located\s*\??\s*$", re.I)
_ORGAN_RE = re.compile(r"^\s*what\s+organ\s+is\s+being\s+operated(?:\s+on)?\s*\??\s*$", re.I)


def _key(text: str) -> str:
    """Fold case, spaces, hyphens and underscores so that label spellings compare equal."""
    return re.sub(r"[\s_\-]+", "", text.strip().lower())


_ANSWER_BY_KEY = {_key(a): a for a in ANSWERS}
_INSTRUMENT_BY_KEY = {_key(i): i for i in INSTRUMENTS}


def canonical_answer(text: str) -> str | None:
    """The vocabulary spelling of an answer ("tissue manipulation" -> "Tissue_Manipulation"), or None."""
    return _ANSWER_BY_KEY.get(_key(text))


def canonical_instrument(text: str) -> str | None:
    """The vocabulary spelling of an instrument ("Bipolar Forceps" -> "bipolar_forceps"), or None."""
    return _INSTRUMENT_BY_KEY.get(_key(text))


def instrument_phrase(instrument: str) -> str:
    """Human wording of an instrument name: "large_needle_driver" -> "large needle driver"."""
    return instrument.replace("_", " ")


def state_phrase(state: str) -> str:
    """A state as a sentence writes it: "Tissue_Manipulation" -> "tissue manipulation"."""
    return state.replace("_", " ").lower()


def answer_kind(answer: str) -> QuestionKind:
    """Which kind of question an answer from the vocabulary belongs to."""
    if answer in ORGANS:
        return QuestionKind.ORGAN
    if answer in STATES:
        return QuestionKind.STATE
    if answer in QUADRANTS:
        return QuestionKind.LOCATION
    raise ValueError(f"{answer!r} is not a Surgical-VQLA answer; expected one of {', '.join(ANSWERS)}")


def parse_question(question: str) -> tuple[QuestionKind, str | None]:
    """Classify a question and find the instrument it names.

    Returns ``(kind, instrument)``; ``instrument`` is None for the organ question. Raises ValueError
    for a question that none of the EndoVis templates matches or that names an unknown instrument.
    """
    if _ORGAN_RE.match(question):
        return QuestionKind.ORGAN, None
    for kind, pattern in ((QuestionKind.STATE, _STATE_RE), (QuestionKind.LOCATION, _LOCATION_RE)):
        match = pattern.match(question)
        if match:
            instrument = canonical_instrument(match.group("inst"))
            if instrument is None:
                raise ValueError(
                    f"question {question!r} names an unknown instrument {match.group('inst')!r}; "
                    f"known instruments: {', '.join(INSTRUMENTS)}"
                )
            return kind, instrument
    raise ValueError(
        f"question {question!r} matches no Surgical-VQLA template; use {ORGAN_QUESTION!r}, "
        f"{STATE_QUESTION!r} or {LOCATION_QUESTION!r}"
    )


def make_question(kind: QuestionKind, instrument: str | None = None) -> str:
    """The EndoVis wording of a question of ``kind`` about ``instrument``."""
    if kind is QuestionKind.ORGAN:
        return ORGAN_QUESTION
    if instrument not in INSTRUMENTS:
        raise ValueError(f"unknown instrument {instrument!r}; known: {', '.join(INSTRUMENTS)}")
    template = STATE_QUESTION if kind is QuestionKind.STATE else LOCATION_QUESTION
    return template.format(instrument=instrument)
