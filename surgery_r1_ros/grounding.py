"""Completion text -> grounded answer: the one reading of a model output, for the runtime, evaluation and rewards.

``ground`` parses the completion (``protocol.parse_output``), clips its box to the model's input image,
scales it to the frame and rounds it to whole pixels (what a sensor_msgs/RegionOfInterest carries), then
checks the reasoning's position claims against the clipped box (``coherence.check_coherence``). A box
that is empty after clipping and rounding is no box.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery_r1_ros.boxes import Box, Size, clip_box, round_box, scale_box
from surgery_r1_ros.coherence import CoherenceResult, check_coherence
from surgery_r1_ros.protocol import PromptMode, is_complete, parse_output


@dataclass(frozen=True)
class Grounding:
    """What a completion says, in the frame's pixels."""

    answer: str | None  # the vocabulary label, or the model's raw words when outside the vocabulary
    answer_in_vocabulary: bool
    reasoning: str | None
    box: tuple[int, int, int, int] | None  # x1, y1, x2, y2 in frame pixels
    model_box: Box | None  # the same box in the model's input pixels (clipped)
    coherence: CoherenceResult | None  # None without reasoning or without a box
    format_ok: bool  # every part the prompt mode asks for is there (protocol.is_complete)
    problems: tuple[str, ...]

    @property
    def coherent(self) -> bool:
        """A box exists and no position claim of the reasoning contradicts it."""
        return self.box is not None and (self.coherence is None or self.coherence.coherent)


def ground(
    text: str, mode: PromptMode, model_size: Size, frame_size: Size | None = None, subject: str | None = None
) -> Grounding:
    """Read a completion answering a question about ``subject`` (an instrument, None: the organ/scene).

    ``model_size`` is the (width, height) of the model's input, the pixel frame of its boxes; ``frame_size``
    that of the camera frame the answer is for (default: the model's input).
    """
    parsed = parse_output(text)
    frame_size = frame_size or model_size
    problems = list(parsed.problems)
    box = model_box = None
    if parsed.box is not None:
        clipped = clip_box(parsed.box, model_size)
        rounded = round_box(clip_box(scale_box(clipped, model_size, frame_size), frame_size))
        if rounded[2] > rounded[0] and rounded[3] > rounded[1]:
            box, model_box = rounded, clipped
        else:
            problems.append(f"box {parsed.box} is empty inside the {model_size[0]}x{model_size[1]} image")
    coherence = None
    if parsed.reasoning and model_box is not None:
        coherence = check_coherence(parsed.reasoning, model_box, model_size, subject)
    return Grounding(
        answer=parsed.answer,
        answer_in_vocabulary=parsed.answer_in_vocabulary,
        reasoning=parsed.reasoning,
        box=box,
        model_box=model_box,
        coherence=coherence,
        format_ok=is_complete(mode, parsed.answer_in_vocabulary, box is not None, parsed.reasoning),
        problems=tuple(problems),
    )
