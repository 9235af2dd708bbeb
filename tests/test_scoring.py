"""One reading of completions and one scoring: ``surgery-r1 eval`` and ``bag eval`` agree on the same answers."""

from __future__ import annotations

import pytest
from ros_helpers import ros_available
from surgery_r1_ros.training.evaluate import Item, score

from surgery_r1_ros.bag_eval.client import fill_answer
from surgery_r1_ros.bag_eval.report import AskedQuestion, EvalReport
from surgery_r1_ros.coherence import check_coherence
from surgery_r1_ros.grounding import ground
from surgery_r1_ros.protocol import PromptMode
from surgery_r1_ros.ros_fields import box_to_roi, ns_to_stamp
from surgery_r1_ros.scoring import AnswerRecord, score_answers

MODEL = (280, 224)  # the model's input: the pixel frame of its boxes
FRAME = (560, 448)  # the camera frame: boxes are scaled x2
ITEMS = [
    Item("a.png", FRAME, "Where is suction located?", "left-top", (40, 40, 200, 160), "suction"),
    Item("a.png", FRAME, "What is the state of suction?", "Suction", (40, 40, 200, 160), "suction"),
    Item("a.png", FRAME, "What organ is being operated?", "kidney", (0, 0, 560, 448), None),
    Item("b.png", FRAME, "Where is stapler located?", "right-top", (300, 20, 540, 200), "stapler"),
    Item("b.png", FRAME, "What is the state of stapler?", "Staple", (300, 20, 540, 200), "stapler"),
    Item("b.png", FRAME, "Where is clip_applier located?", "left-bottom", (20, 250, 200, 440), "clip_applier"),
    Item("b.png", FRAME, "What is the state of clip_applier?", "Clipping", (20, 250, 200, 440), "clip_applier"),
    Item("b.png", FRAME, "What organ is being operated?", "kidney", (0, 0, 560, 448), None),
]
COMPLETIONS = [
    "<think>The suction is in the upper left.</think><answer>left-top</answer><box>[20,20,100,80]</box>",
    "<think>The suction is in the lower right.</think><answer>Suction</answer><box>[20,20,60,80]</box>",
    "<answer>kidney</answer>",  # no box
    "<think>The stapler sits at the top right.</think><answer>right-top</answer><box>[150,10,400,300]</box>",  # clipped
    "<think>The stapler is stapling.</think><answer>banana</answer><box>[150,10,270,100]</box>",  # not a label
    "<think>The clip applier is at the bottom left.</think><answer>left-bottom</answer>",  # reasoning, no box
    "<answer>Clipping</answer><box>[300,300,400,400]</box>",  # a box entirely outside the image: no box
    "",  # nothing at all (for the node: an answer that never came)
]


def _bag_report(mode: PromptMode) -> EvalReport:
    """The same completions as the node would reply them (engine: ``ground``; node: box as RegionOfInterest)."""
    from surgery_r1_interfaces.srv import AskQuestion

    questions = []
    for i, (item, text) in enumerate(zip(ITEMS, COMPLETIONS, strict=True)):
        q = AskedQuestion(i, item.question, item.answer, list(item.box), list(item.size), i, 0.0, item.subject)
        grounded = ground(text, mode, MODEL, item.size, item.subject)
        reply = AskQuestion.Response(
            success=bool(grounded.answer),
            error="" if grounded.answer else "the model gave no readable answer",
            answer=grounded.answer or "",
            reasoning=grounded.reasoning or "",
            box=box_to_roi(grounded.box),
            coherent=grounded.coherent,
        )
        reply.image_header.stamp.sec, reply.image_header.stamp.nanosec = ns_to_stamp(i)
        fill_answer(q, reply, 1.0, item.size)
        questions.append(q)
    return EvalReport("bag", "q.jsonl", "model", "start", "pause", mode is PromptMode.REASON, questions)


@pytest.mark.skipif(not ros_available(), reason="the reply messages need the ROS wheels")
@pytest.mark.parametrize("mode", [PromptMode.GROUND, PromptMode.REASON])
def test_eval_and_bag_eval_report_the_same_figures(mode):
    model_card = score(ITEMS, COMPLETIONS, mode, MODEL)
    bag = _bag_report(mode).metrics()
    figures = ("n", "mode", "accuracy", "accuracy_by_kind", "f_score", "miou", "miou_legacy", "format_rate",
               "coherence_rate", "n_with_reasoning", "claims_rate", "claimed_coherence_rate", "true_claims_rate",
               "subject_rate",
               "per_class", "confusion", "state_by_subject", "state_claims_rate", "state_claim_accuracy",
               "state_agreement_rate")  # fmt: skip
    assert {k: bag[k] for k in figures} == {k: model_card[k] for k in figures}
    # and the figures are the intended ones, not merely equal
    assert model_card["accuracy"] == pytest.approx(6 / 8)  # banana and the empty completion are wrong
    assert model_card["accuracy_by_kind"] == pytest.approx({"organ": 1 / 2, "state": 2 / 3, "location": 1.0})
    assert model_card["format_rate"] == pytest.approx(3 / 8)  # 0, 1 and 3 have every part
    clipped = (540 - 300) * (200 - 20) / ((560 - 300) * (448 - 20))  # the true box lies inside the clipped one
    assert model_card["miou"] == pytest.approx((1.0 + 0.5 + clipped + 1.0) / 8)
    if mode is PromptMode.REASON:
        # reasoned: 0 coherent, 1 contradicted, 3 coherent (clipped box still top right), 4 no claim, 5 no box
        assert model_card["n_with_reasoning"] == 5
        assert model_card["coherence_rate"] == pytest.approx(3 / 5)
        assert model_card["claims_rate"] == pytest.approx(3 / 5)
        assert model_card["claimed_coherence_rate"] == pytest.approx(2 / 3)  # 0 and 3 of 0, 1, 3
        assert model_card["subject_rate"] == pytest.approx(1.0)  # every reasoning names its instrument
    else:
        assert model_card["coherence_rate"] is None and model_card["subject_rate"] is None


def test_reasoning_about_another_instrument_is_coherent_but_not_about_the_subject():
    """The coherence check only sees claims about the subject: reasoning about another instrument passes it.
    ``subject_rate`` and ``claimed_coherence_rate`` show what the coherence rate alone hides."""
    box = (20.0, 20.0, 200.0, 160.0)  # upper left of FRAME

    def record(subject: str | None, reasoning: str, coherent: bool) -> AnswerRecord:
        return AnswerRecord("left-top", box, FRAME, subject, "left-top", box, reasoning, coherent)

    records = [
        record("bipolar_forceps", "The asked-about stapler is in the lower right.", True),  # no claim on the subject
        record("bipolar_forceps", "The bipolar forceps is in the upper left.", True),
        record("suction", "The bipolar forceps is in the lower right. Its state is performing suction.", True),
        record("clip_applier", "The clip applier is in the lower right.", False),  # contradicted by the box
        record(None, "The kidney fills the lower right.", False),  # the organ: not an instrument question
    ]
    report = score_answers(records, PromptMode.REASON)
    assert report["coherence_rate"] == pytest.approx(3 / 5)
    assert report["subject_rate"] == pytest.approx(2 / 4)  # "performing suction" names the state, not the tool
    assert report["claims_rate"] == pytest.approx(3 / 5)  # 1, 3 and the organ's claim
    assert report["claimed_coherence_rate"] == pytest.approx(1 / 3)
    assert report["true_claims_rate"] == pytest.approx(1 / 3)  # the true box is the predicted one here


def test_true_claims_rate_checks_the_reasoning_against_the_true_box_not_the_predicted_one():
    """Reasoning right about the frame but next to a wrong box is incoherent and true; the reverse is coherent
    and false. Coherence alone cannot tell a wrong box from a wrong reasoning."""
    upper_left, lower_right = (20.0, 20.0, 200.0, 160.0), (400.0, 300.0, 600.0, 440.0)

    def record(truth_box, box, reasoning: str) -> AnswerRecord:
        coherent = check_coherence(reasoning, box, FRAME, "stapler").coherent
        return AnswerRecord("left-top", truth_box, FRAME, "stapler", "left-top", box, reasoning, coherent)

    right_words_wrong_box = record(upper_left, lower_right, "The stapler is in the upper left.")
    wrong_words_own_box = record(upper_left, lower_right, "The stapler is in the lower right.")
    no_claim = record(upper_left, upper_left, "The stapler is there.")
    report = score_answers([right_words_wrong_box, wrong_words_own_box, no_claim], PromptMode.REASON)
    assert report["claimed_coherence_rate"] == pytest.approx(1 / 2) == report["true_claims_rate"]
    assert score_answers([right_words_wrong_box], PromptMode.REASON)["true_claims_rate"] == 1.0
    assert score_answers([wrong_words_own_box], PromptMode.REASON)["true_claims_rate"] == 0.0
    assert score_answers([no_claim], PromptMode.GROUND)["true_claims_rate"] is None


def test_state_claims_show_reasoning_that_names_one_state_and_answers_another():
    """Over state questions: how often the reasoning names a state, names the true one, and names the answer."""

    def record(truth: str, answer: str, reasoning: str) -> AnswerRecord:
        return AnswerRecord(truth, None, FRAME, "stapler", answer, None, reasoning)

    idle = "Its jaws are closed and it rests away from the tissue; that is idle."
    records = [
        record("Staple", "Staple", "A row of staples lines the tissue; that is staple."),  # right, and answered
        record("Staple", "Staple", idle),  # the wrong state, and not the answer given
        record("Idle", "Staple", idle),  # the right state, but not the answer given
        record("Idle", "Idle", "The stapler is in the upper left."),  # names no state
        record("left-top", "left-top", idle),  # not a state question
    ]
    report = score_answers(records, PromptMode.REASON)
    assert report["state_claims_rate"] == pytest.approx(3 / 4)
    assert report["state_claim_accuracy"] == pytest.approx(2 / 3)
    assert report["state_agreement_rate"] == pytest.approx(1 / 3)
    direct = score_answers(records, PromptMode.GROUND)
    assert direct["state_claims_rate"] is direct["state_claim_accuracy"] is direct["state_agreement_rate"] is None


def test_state_by_subject_shows_an_instrument_answered_from_the_prior():
    def record(subject: str, truth: str, answer: str | None) -> AnswerRecord:
        return AnswerRecord(truth, None, FRAME, subject, answer)

    truths = ["Tool_Manipulation", "Tool_Manipulation", "Cauterization", "Grasping"]
    records = [record("bipolar_forceps", t, "Grasping") for t in truths]  # one answer whatever the frame
    records += [record("stapler", t, a) for t, a in [("Staple", "Staple"), ("Idle", "Idle"), ("Idle", None)]]
    records += [record("stapler", "left-top", "left-top"), record(None, "kidney", "kidney")]  # not state questions
    table = score_answers(records, PromptMode.GROUND)["state_by_subject"]
    assert table == {
        "bipolar_forceps": {"n": 4, "accuracy": 0.25, "prior": 0.5, "answers": 1},
        "stapler": {"n": 3, "accuracy": pytest.approx(2 / 3), "prior": pytest.approx(2 / 3), "answers": 3},
    }


def test_ground_clips_scales_and_checks_coherence():
    text = "<think>The suction is in the upper left.</think><answer>left-top</answer><box>[-10,120,100,300]</box>"
    grounded = ground(text, PromptMode.REASON, MODEL, FRAME, "suction")
    assert grounded.model_box == (0.0, 120.0, 100.0, 224.0)  # clipped to the model's image
    assert grounded.box == (0, 240, 200, 448)  # then scaled to the frame
    assert grounded.format_ok and grounded.coherence is not None and not grounded.coherent  # centre is low
    empty = ground("<answer>Idle</answer><box>[300,300,400,400]</box>", PromptMode.GROUND, MODEL, FRAME)
    assert empty.box is None and not empty.format_ok and any("empty" in p for p in empty.problems)
