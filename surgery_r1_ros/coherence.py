"""The multimodal coherence check: do the reasoning's position claims agree with the predicted box?

Surgery-R1 calls a reasoning that places the target on one side while the box sits on the other a
"positional illusion". We read position claims from the reasoning (left/right/top/bottom/centre,
quadrant names such as "left-top", "upper left", "lower right corner") and check each against the
box centre. Claims are attributed to the instrument a sentence names: a sentence naming exactly one
instrument sets the referent, a sentence naming none keeps the previous one, and only claims about
the question's subject are checked (for the organ question: claims in sentences naming no
instrument). GRPO's coherence reward, evaluation's coherence rate and the runtime's ``coherent`` flag
all call ``check_coherence``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from surgery_r1_ros.boxes import Box, Size, normalized_center
from surgery_r1_ros.vocab import INSTRUMENTS, STATES

# A claim within this fraction of the image of the dividing line is too close to call.
BOUNDARY_MARGIN = 0.05
# "centre" claims hold while the box centre stays this close to the image centre (fraction of size).
CENTRE_RADIUS = 0.25

_HORIZONTAL = {"left": "left", "right": "right"}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_CENTRE = {"centre", "center", "middle", "central"}
# "centre" is a position claim in "in the centre"/"the central area", not in "its box centre".
_CENTRE_LEADS = {"the", "in", "at", "near", "to"}
_WORD_RE = re.compile(r"[a-z]+")
_SENTENCE_RE = re.compile(r"(?<=[.!?;])\s+|\n+")
_INSTRUMENT_PATTERNS = {name: re.compile(r"\b" + r"[\s_]+".join(name.split("_")) + r"\b", re.I) for name in INSTRUMENTS}
# "suction" is both an instrument and a state; only count it as the instrument when a tool word follows
# or it is not followed by a state word ("in suction", "performing suction" name the state).
_STATE_USE_OF_SUCTION = re.compile(r"\b(?:in|performing|doing|applying|state\s+is|that\s+is)\s+suction\b", re.I)
# A state as reasoning writes it ("tissue manipulation", "Tissue_Manipulation"); "suction" only where it is used
# as a state (above), since it also names an instrument.
_STATE_PATTERNS = {
    state: re.compile(r"\b" + r"[\s_]+".join(state.split("_")) + r"\b", re.I) for state in STATES if state != "Suction"
}


@dataclass(frozen=True)
class PositionClaim:
    """One position phrase found in the reasoning, with the sentence it came from."""

    horizontal: str | None  # "left" | "right" | None
    vertical: str | None  # "top" | "bottom" | None
    centre: bool
    sentence: str


@dataclass(frozen=True)
class CoherenceResult:
    """Checked claims and the ones the box contradicts; coherent when none is contradicted."""

    claims: tuple[PositionClaim, ...]
    contradicted: tuple[PositionClaim, ...]

    @property
    def coherent(self) -> bool:
        return not self.contradicted

    @property
    def has_claims(self) -> bool:
        return bool(self.claims)


def _instruments_named(sentence: str) -> set[str]:
    named = {name for name, pattern in _INSTRUMENT_PATTERNS.items() if pattern.search(sentence)}
    if "suction" in named and _STATE_USE_OF_SUCTION.search(sentence):
        named.discard("suction")
    return named


def claims_in(sentence: str) -> list[PositionClaim]:
    """Position claims in one sentence; words next to each other ("upper left") form one claim."""
    words = _WORD_RE.findall(sentence.lower())
    claims: list[PositionClaim] = []
    i = 0
    while i < len(words):
        word = words[i]
        horizontal, vertical = _HORIZONTAL.get(word), _VERTICAL.get(word)
        if horizontal or vertical:
            nxt = words[i + 1] if i + 1 < len(words) else ""
            if horizontal and _VERTICAL.get(nxt):
                vertical, i = _VERTICAL[nxt], i + 1
            elif vertical and _HORIZONTAL.get(nxt):
                horizontal, i = _HORIZONTAL[nxt], i + 1
            claims.append(PositionClaim(horizontal, vertical, False, sentence))
        elif word in _CENTRE and i > 0 and words[i - 1] in _CENTRE_LEADS:
            claims.append(PositionClaim(None, None, True, sentence))
        i += 1
    return claims


def claim_holds(claim: PositionClaim, box: Box, size: Size) -> bool:
    """Whether the box centre is consistent with the claim (ties near a dividing line are allowed)."""
    cx, cy = normalized_center(box, size)
    if claim.centre:
        return abs(cx - 0.5) <= CENTRE_RADIUS and abs(cy - 0.5) <= CENTRE_RADIUS
    ok = True
    if claim.horizontal == "left":
        ok &= cx <= 0.5 + BOUNDARY_MARGIN
    elif claim.horizontal == "right":
        ok &= cx >= 0.5 - BOUNDARY_MARGIN
    if claim.vertical == "top":
        ok &= cy <= 0.5 + BOUNDARY_MARGIN
    elif claim.vertical == "bottom":
        ok &= cy >= 0.5 - BOUNDARY_MARGIN
    return bool(ok)


def _sentences(reasoning: str) -> list[str]:
    return [s for s in (s.strip() for s in _SENTENCE_RE.split(reasoning)) if s]


def names_subject(reasoning: str, subject: str) -> bool:
    """Whether the reasoning names the instrument ``subject`` at all (reasoning about another instrument
    makes no claim about the subject, so the coherence check cannot catch it; this can)."""
    return any(subject in _instruments_named(sentence) for sentence in _sentences(reasoning))


def subject_claims(reasoning: str, subject: str | None) -> list[PositionClaim]:
    """Claims about ``subject`` (an instrument name; None = the scene/organ) in the reasoning."""
    claims: list[PositionClaim] = []
    referent: str | None = None
    ambiguous = False
    for sentence in _sentences(reasoning):
        named = _instruments_named(sentence)
        if len(named) == 1:
            referent, ambiguous = next(iter(named)), False
        elif len(named) > 1:
            ambiguous = True
        if ambiguous or referent != subject:
            continue
        claims.extend(claims_in(sentence))
    return claims


def check_coherence(reasoning: str, box: Box, image_size: Size, subject: str | None) -> CoherenceResult:
    """Check the reasoning's position claims about ``subject`` against ``box`` in an image of ``image_size``."""
    claims = tuple(subject_claims(reasoning, subject))
    contradicted = tuple(c for c in claims if not claim_holds(c, box, image_size))
    return CoherenceResult(claims, contradicted)


def state_mentions(reasoning: str) -> list[tuple[int, str]]:
    """Where the reasoning names an instrument state: (character offset, state in the vocabulary's spelling),
    in order. For "suction" the offset is that of the phrase that makes it a state ("performing suction")."""
    found = [(m.start(), state) for state, pattern in _STATE_PATTERNS.items() for m in pattern.finditer(reasoning)]
    found += [(m.start(), "Suction") for m in _STATE_USE_OF_SUCTION.finditer(reasoning)]
    return sorted(found)


def stated_state(reasoning: str) -> str | None:
    """The instrument state the reasoning concludes: the last state it names ("its state is idle: ..."), in
    the vocabulary's spelling, or None when it names none. Evaluation compares it with the truth and with the
    answer: reasoning that names one state and answers another explains nothing."""
    mentions = state_mentions(reasoning)
    return mentions[-1][1] if mentions else None


def describe_position(box: Box, size: Size) -> str:
    """Plain wording of where a box sits ("upper left", "lower right", "centre"), for writing reasoning."""
    cx, cy = normalized_center(box, size)
    if abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1:
        return "centre"
    return f"{'upper' if cy < 0.5 else 'lower'} {'left' if cx < 0.5 else 'right'}"


__all__ = [
    "CoherenceResult",
    "PositionClaim",
    "check_coherence",
    "claim_holds",
    "claims_in",
    "describe_position",
    "state_mentions",
    "stated_state",
    "subject_claims",
]
