"""GRPO reward functions on hand-written completions."""

import pytest
from surgery_r1_ros.training.rewards import (
    NO_CLAIM_COHERENCE,
    accuracy_reward,
    coherence_reward,
    completion_text,
    format_reward,
    iou_reward,
    reward_functions,
)

SIZE = [280, 224]
LEFT_TOP_BOX = [20, 20, 100, 80]  # centre (60, 50): left-top of a 280x224 image
GOOD_REASON = (
    "<think>The bipolar forceps is in the upper left of the view. Its jaws are closed.</think>"
    "<answer>left-top</answer><box>[20,20,100,80]</box>"
)
LYING_REASON = (
    "<think>The bipolar forceps is in the lower right of the view.</think>"
    "<answer>left-top</answer><box>[20,20,100,80]</box>"
)
SILENT_REASON = "<think>The bipolar forceps has its jaws closed.</think><answer>Idle</answer><box>[20,20,100,80]</box>"


def test_completion_text_reads_strings_and_messages():
    assert completion_text("<answer>kidney</answer>") == "<answer>kidney</answer>"
    assert completion_text([{"role": "assistant", "content": "<answer>kidney</answer>"}]) == "<answer>kidney</answer>"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}]}]) == "a"


def test_format_reward_by_mode():
    completions = [
        "<answer>kidney</answer>",  # answer mode: enough
        "<answer>kidney</answer>",  # ground mode: box missing
        "<answer>Grasping</answer><box>[1,2,3,4]</box>",
        "<answer>Grasping</answer><box>[1,2,3]</box>",  # broken box
        "<answer>banana</answer><box>[1,2,3,4]</box>",  # not a label
        "<answer>Idle</answer><box>[1,2,3,4]</box>",  # reason mode without <think>
        GOOD_REASON,
        "",
    ]
    modes = ["answer", "ground", "ground", "ground", "ground", "reason", "reason", "ground"]
    assert format_reward(completions, mode=modes, model_size=[SIZE] * 8) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_accuracy_reward_uses_vocabulary_spelling():
    completions = [
        "<answer>tissue manipulation</answer>",
        "<answer>Tissue_Manipulation</answer>",
        "<answer>Grasping</answer>",
        "no tags at all",
    ]
    truth = ["Tissue_Manipulation"] * 4
    assert accuracy_reward(completions, answer=truth, model_size=[SIZE] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_iou_reward_is_true_continuous_iou():
    truth = [0, 0, 10, 10]
    completions = [
        "<box>[0,0,10,10]</box>",  # exact
        "<box>[0,0,10,5]</box>",  # half
        "<box>[20,20,30,30]</box>",  # disjoint: 0, not the legacy ~0.46
        "<answer>Idle</answer>",  # no box
        "<box>[10,10,0,0]</box>",  # inverted: unreadable
        "<box>[0,0,10,10]</box>",  # a VQA row without a truth box: not applicable
    ]
    rewards = iou_reward(completions, target_box=[truth] * 5 + [None], model_size=[SIZE] * 6)
    assert rewards[:5] == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.0])
    assert rewards[5] is None


def test_coherence_reward():
    completions = [GOOD_REASON, LYING_REASON, SILENT_REASON, "<answer>left-top</answer><box>[20,20,100,80]</box>",
                   "<think>The bipolar forceps is in the upper left.</think><answer>left-top</answer>",
                   GOOD_REASON]  # fmt: skip
    modes = ["reason"] * 5 + ["ground"]
    rewards = coherence_reward(completions, mode=modes, model_size=[SIZE] * 6, subject=["bipolar_forceps"] * 6)
    assert rewards == [1.0, 0.0, NO_CLAIM_COHERENCE, 0.0, 0.0, None]


def test_coherence_reward_only_checks_the_subject():
    text = (
        "<think>A suction is in the lower right of the view. The bipolar forceps is in the upper left.</think>"
        "<answer>left-top</answer><box>[20,20,100,80]</box>"
    )
    assert coherence_reward([text], mode=["reason"], model_size=[SIZE], subject=["bipolar_forceps"]) == [1.0]
    assert coherence_reward([text], mode=["reason"], model_size=[SIZE], subject=["suction"]) == [0.0]


def test_rewards_accept_trl_keyword_call():
    # TRL passes prompts, completion_ids, every dataset column and trainer state as keywords.
    kwargs = {
        "prompts": ["p"],
        "completions": [[{"role": "assistant", "content": GOOD_REASON}]],
        "completion_ids": [[1, 2]],
        "mode": ["reason"],
        "answer": ["left-top"],
        "target_box": [LEFT_TOP_BOX],
        "model_size": [SIZE],
        "subject": ["bipolar_forceps"],
        "trainer_state": None,
    }
    funcs, weights = reward_functions({"format": 0.5, "accuracy": 1.0, "iou": 1.0, "coherence": 0.5})
    assert weights == [0.5, 1.0, 1.0, 0.5]
    assert [f(**kwargs)[0] for f in funcs] == [1.0, 1.0, 1.0, 1.0]


def test_reward_functions_reject_unknown_names():
    with pytest.raises(ValueError, match="unknown reward"):
        reward_functions({"fluency": 1.0})
