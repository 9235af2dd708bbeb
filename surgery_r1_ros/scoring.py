"""The one scoring of answers against the truth: ``surgery-r1 eval`` and ``surgery-r1 bag eval`` both report it.

An ``AnswerRecord`` is one question with its truth and the answer it got, whatever produced it (a completion
read by ``grounding.ground``, or the node's reply over ROS). ``score_answers`` turns records into the report
keys the model card uses; ``DEFINITIONS`` states each rule and goes into every report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from surgery_r1_ros import metrics
from surgery_r1_ros.boxes import Box, Size
from surgery_r1_ros.coherence import check_coherence, names_subject, stated_state, subject_claims
from surgery_r1_ros.protocol import PromptMode, is_complete
from surgery_r1_ros.vocab import ANSWERS, QuestionKind, answer_kind, canonical_answer

T = TypeVar("T")
NONE_LABEL = "<none>"  # the predicted label of a question with no readable vocabulary answer
ZERO_BOX: Box = (0.0, 0.0, 0.0, 0.0)
DEFINITIONS = {
    "accuracy": "share of questions whose answer equals the label (unanswered or unreadable answers are wrong)",
    "f_score": "macro F1 over labels seen in truth or prediction (sklearn, zero_division=1); any answer outside "
    f"the vocabulary counts as the one label {NONE_LABEL}",
    "miou": "mean true IoU of predicted and true boxes in frame pixels, over questions with a true box; "
    "a missing box scores 0",
    "miou_legacy": "Surgical-VQLA mIoU (normalised boxes, +1 rule, no clamp) over the same questions; "
    "a missing box is [0,0,0,0]",
    "format_rate": "share of questions answered with every part the prompt mode asks for (protocol.is_complete): "
    "a vocabulary answer, a box, and non-empty reasoning in reasoning mode",
    "coherence_rate": "reasoning mode only: among answers with non-empty reasoning, the share that have a box "
    "and no position claim about the question's subject contradicted by it (coherence.check_coherence); "
    "reasoning without a box is incoherent, reasoning without a checkable claim is coherent",
    "claims_rate": "reasoning mode only: among answers with reasoning, the share making >=1 checked claim "
    "about the subject next to a box",
    "claimed_coherence_rate": "reasoning mode only: coherence_rate over the answers counted by claims_rate "
    "(reasoning that makes no checkable claim counts as coherent in coherence_rate; here it is left out)",
    "true_claims_rate": "reasoning mode only: among answers whose reasoning makes >=1 checkable claim about the "
    "subject, the share whose claims all hold against the TRUE box (claimed_coherence_rate checks them against the "
    "predicted box: a reasoning can be right about the frame and still contradict a wrong box)",
    "subject_rate": "reasoning mode only: among instrument questions answered with reasoning, the share whose "
    "reasoning names the instrument asked about (coherence.names_subject)",
    "state_claims_rate": "reasoning mode only: among state questions answered with reasoning, the share whose "
    "reasoning names a state (coherence.stated_state: the last one it names)",
    "state_claim_accuracy": "reasoning mode only: among those, the share whose stated state is the true one",
    "state_agreement_rate": "reasoning mode only: among those, the share whose answer is the state the reasoning "
    "names (an answer that differs is not explained by its reasoning)",
    "accuracy_by_kind": "accuracy over the questions of each kind (organ, state, location), told by the true label",
    "state_by_subject": "state questions per instrument: n, accuracy, prior (the accuracy of always giving that "
    "instrument's commonest true state in these questions) and answers (how many different labels were given)",
}


@dataclass(frozen=True)
class AnswerRecord:
    """One question's truth and the answer it got (``answer`` None: unanswered)."""

    truth: str
    truth_box: Box | None  # frame pixels
    frame_size: Size  # (width, height) of the frame the boxes are in
    subject: str | None = None  # the instrument asked about (None: the organ)
    answer: str | None = None
    box: Box | None = None  # frame pixels
    reasoning: str | None = None
    coherent: bool = False  # the runtime's flag: a box and no contradicted claim

    @property
    def label(self) -> str:
        """The predicted label: the vocabulary spelling of the answer, else NONE_LABEL."""
        return (canonical_answer(self.answer) if self.answer else None) or NONE_LABEL

    def format_ok(self, mode: PromptMode) -> bool:
        return is_complete(mode, self.label != NONE_LABEL, self.box is not None, self.reasoning)

    def iou(self) -> float | None:
        """True IoU with the truth box (0 without a predicted box; None without a true box)."""
        if self.truth_box is None:
            return None
        return metrics.mean_iou([self.truth_box], [self.box])


def score_answers(records: Sequence[AnswerRecord], mode: PromptMode) -> dict:
    """accuracy, f_score, miou, miou_legacy, format_rate, the reasoning rates, per-class table, confusion."""
    mode = PromptMode(mode)
    n = len(records)
    truth = [r.truth for r in records]
    predicted = [r.label for r in records]
    boxed = [r for r in records if r.truth_box is not None]
    reasoning_mode = mode is PromptMode.REASON
    reasoned = [r for r in records if r.reasoning] if reasoning_mode else []
    with_claims = [r for r in reasoned if subject_claims(r.reasoning, r.subject)]  # found once per answer
    claimed = [r for r in with_claims if r.box is not None]
    claimed_of_truth = [r for r in with_claims if r.truth_box is not None]
    about_instruments = [r for r in reasoned if r.subject is not None]
    stated = [(r, stated_state(r.reasoning)) for r in reasoned if _kind(r.truth) is QuestionKind.STATE]
    stating = [(r, state) for r, state in stated if state is not None]
    return {
        "n": n,
        "mode": str(mode),
        "accuracy": metrics.accuracy(truth, predicted),
        "accuracy_by_kind": accuracy_by_kind(truth, predicted),
        "state_by_subject": state_by_subject(records),
        "f_score": metrics.f_score(truth, predicted),
        "miou_legacy": metrics.legacy_miou(
            [r.truth_box for r in boxed], [r.box or ZERO_BOX for r in boxed], [r.frame_size for r in boxed]
        )
        if boxed
        else None,
        "miou": metrics.mean_iou([r.truth_box for r in boxed], [r.box for r in boxed]) if boxed else None,
        "coherence_rate": (sum(r.coherent for r in reasoned) / len(reasoned) if reasoned else 0.0)
        if reasoning_mode
        else None,
        "format_rate": sum(r.format_ok(mode) for r in records) / n if n else 0.0,
        "n_with_reasoning": len(reasoned) if reasoning_mode else None,
        "claims_rate": (len(claimed) / len(reasoned) if reasoned else 0.0) if reasoning_mode else None,
        "claimed_coherence_rate": _share(claimed, lambda r: r.coherent) if reasoning_mode else None,
        "true_claims_rate": _share(claimed_of_truth, _claims_hold_on_truth) if reasoning_mode else None,
        "subject_rate": _share(about_instruments, lambda r: names_subject(r.reasoning, r.subject))
        if reasoning_mode
        else None,
        "state_claims_rate": (len(stating) / len(stated) if stated else None) if reasoning_mode else None,
        "state_claim_accuracy": _share(stating, lambda pair: pair[1] == pair[0].truth) if reasoning_mode else None,
        "state_agreement_rate": _share(stating, lambda pair: pair[1] == pair[0].label) if reasoning_mode else None,
        "per_class": [vars(row) for row in metrics.per_class(truth, predicted)],
        "confusion": confusion(truth, predicted),
        "definitions": DEFINITIONS,
    }


def _claims_hold_on_truth(record: AnswerRecord) -> bool:
    return check_coherence(record.reasoning or "", record.truth_box, record.frame_size, record.subject).coherent


def _share(records: Sequence[T], holds: Callable[[T], bool]) -> float | None:
    """The share of ``records`` for which ``holds`` is true (None without records)."""
    return sum(bool(holds(r)) for r in records) / len(records) if records else None


def _kind(label: str) -> QuestionKind | None:
    """The question kind a true label answers (None: a label outside the vocabulary)."""
    return answer_kind(label) if label in ANSWERS else None


def accuracy_by_kind(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """Accuracy per question kind, the kind told by the true label (labels outside the vocabulary: none)."""
    pairs: dict[str, list[tuple[str, str]]] = {}
    for t, p in zip(truth, predicted, strict=True):
        if t in ANSWERS:
            pairs.setdefault(str(answer_kind(t)), []).append((t, p))
    return {
        str(kind): metrics.accuracy(*zip(*pairs[str(kind)], strict=True)) for kind in QuestionKind if str(kind) in pairs
    }


def state_by_subject(records: Sequence[AnswerRecord]) -> dict[str, dict]:
    """State questions per instrument, beside the per-instrument prior: a model that gives one state for every
    question about an instrument (answers 1) is not reading that instrument's state from the frame."""
    by_subject: dict[str, list[tuple[str, str]]] = {}
    for r in records:
        if r.subject is not None and _kind(r.truth) is QuestionKind.STATE:
            by_subject.setdefault(r.subject, []).append((r.truth, r.label))
    table = {}
    for subject, pairs in sorted(by_subject.items()):
        truth, predicted = zip(*pairs, strict=True)
        table[subject] = {
            "n": len(pairs),
            "accuracy": metrics.accuracy(truth, predicted),
            "prior": max(truth.count(label) for label in set(truth)) / len(pairs),
            "answers": len(set(predicted)),
        }
    return table


def confusion(truth: Sequence[str], predicted: Sequence[str]) -> dict:
    """Counts of (truth, prediction) pairs: truth labels first, then labels only ever predicted."""
    labels = sorted(set(truth)) + sorted(set(predicted) - set(truth))
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t]][index[p]] += 1
    return {"labels": labels, "matrix": matrix}
