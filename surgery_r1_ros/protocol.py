"""The one text protocol between us and the model: prompt wording, target text and output parsing.

A completion is ``<think>reasoning</think><answer>label</answer><box>[x1,y1,x2,y2]</box>`` with the
box in pixels of the image the model saw (after the processor resized it). Which parts are asked
for depends on the prompt mode. Training targets, GRPO rewards, evaluation and the runtime all use
these functions, so the three can never disagree about what a well-formed answer is.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from surgery_r1_ros.boxes import Box
from surgery_r1_ros.vocab import canonical_answer


class PromptMode(enum.StrEnum):
    """What the model is asked to produce."""

    ANSWER = "answer"  # Visual-QA: the label only
    GROUND = "ground"  # Grounding-QA: label and box (the fast, direct runtime mode)
    REASON = "reason"  # chain of thought, then label and box

    @classmethod
    def for_request(cls, reasoning: bool) -> PromptMode:
        """The runtime mode: reasoning on or off; both always give a box."""
        return cls.REASON if reasoning else cls.GROUND


INSTRUCTIONS: dict[PromptMode, str] = {
    PromptMode.ANSWER: "Reply with <answer>.",
    PromptMode.GROUND: "Reply with <answer> and <box>.",
    PromptMode.REASON: "Think in <think>, then reply with <answer> and <box>.",
}


def prompt_text(question: str, mode: PromptMode) -> str:
    """The user text that follows the image: the question and the mode's instruction."""
    return f"{question.strip()}\n{INSTRUCTIONS[mode]}"


def build_messages(question: str, mode: PromptMode) -> list[dict]:
    """Chat messages for the processor's chat template: the image comes first, then the text.

    Image-first is what lets the runtime encode a frame before any question about it arrives.
    """
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": prompt_text(question, mode)}],
        }
    ]


BOX_DIGITS = 3


def format_box(box: Box) -> str:
    """Whole-pixel box text ``[x1,y1,x2,y2]``, each number zero-padded to ``BOX_DIGITS`` digits ("[074,022,...]").

    Why padded: a model writes a number digit by digit, and with plain numbers the first digit "1" stands for
    1, 10-19 and 100-199 at once, so greedy decoding of an uncertain number picks whichever leading digit
    covers most values, not the likeliest position (the built-in model wrote y1 = 10 or 16 for every organ
    box while the truth's median was 74). Padded, the digits go in place-value order: the first is the
    hundreds, and greedy decoding picks the likeliest hundred, then ten, then unit. The parser reads both.
    """
    return "[" + ",".join(f"{round(v):0{BOX_DIGITS}d}" for v in box) + "]"


def build_target(answer: str, box: Box | None = None, reasoning: str | None = None) -> str:
    """The completion the model is trained to produce; its parts also decide the prompt mode."""
    parts = []
    if reasoning is not None:
        if box is None:
            raise ValueError("a reasoning target also needs a box")
        parts.append(f"<think>{reasoning.strip()}</think>")
    parts.append(f"<answer>{answer}</answer>")
    if box is not None:
        parts.append(f"<box>{format_box(box)}</box>")
    return "".join(parts)


def target_mode(reasoning: str | None, box: Box | None) -> PromptMode:
    """The prompt mode whose target has these parts."""
    if reasoning is not None:
        return PromptMode.REASON
    return PromptMode.GROUND if box is not None else PromptMode.ANSWER


_THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
_BOX_RE = re.compile(r"<box>(.*?)</box>", re.S)
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class ParsedOutput:
    """What could be read from a completion. Missing or broken parts are None, never an exception."""

    reasoning: str | None
    answer: str | None  # the vocabulary spelling when the label is known, else the raw text
    box: Box | None
    answer_in_vocabulary: bool
    problems: tuple[str, ...] = field(default=())

    def format_ok(self, mode: PromptMode) -> bool:
        """Whether every part the mode asks for is present and readable."""
        return is_complete(mode, self.answer_in_vocabulary, self.box is not None, self.reasoning)


def is_complete(mode: PromptMode, answer_in_vocabulary: bool, has_box: bool, reasoning: str | None) -> bool:
    """The format rule: a vocabulary answer, a box unless the mode is ANSWER, reasoning in REASON mode."""
    if not answer_in_vocabulary:
        return False
    if mode is not PromptMode.ANSWER and not has_box:
        return False
    return mode is not PromptMode.REASON or bool(reasoning)


def _parse_box(text: str) -> tuple[Box | None, str | None]:
    numbers = [float(n) for n in _NUMBER_RE.findall(text)]
    if len(numbers) != 4:
        return None, f"box needs 4 numbers, found {len(numbers)} in {text.strip()[:40]!r}"
    x1, y1, x2, y2 = numbers
    if x2 < x1 or y2 < y1:
        return None, f"box {text.strip()[:40]!r} is inverted"
    return (x1, y1, x2, y2), None


def parse_output(text: str) -> ParsedOutput:
    """Read reasoning, answer and box from a model completion, tolerating any junk around them."""
    problems: list[str] = []
    think = _THINK_RE.search(text)
    reasoning = think.group(1).strip() if think else None
    answer_match = _ANSWER_RE.search(text)
    answer: str | None = None
    in_vocabulary = False
    if answer_match is None:
        problems.append("no <answer>...</answer>")
    else:
        raw = answer_match.group(1).strip()
        known = canonical_answer(raw)
        in_vocabulary = known is not None
        answer = known if known is not None else raw
        if not in_vocabulary:
            problems.append(f"answer {raw[:40]!r} is not a Surgical-VQLA label")
    box: Box | None = None
    box_match = _BOX_RE.search(text)
    if box_match is None:
        problems.append("no <box>...</box>")
    else:
        box, problem = _parse_box(box_match.group(1))
        if problem:
            problems.append(problem)
    return ParsedOutput(reasoning, answer, box, in_vocabulary, tuple(problems))
