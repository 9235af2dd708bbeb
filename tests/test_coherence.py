"""The coherence check catches reasoning whose stated position contradicts the box."""

import pytest

from surgery_r1_ros.coherence import check_coherence, claims_in, describe_position, stated_state

SIZE = (1000, 800)
LEFT_TOP = (50, 40, 300, 250)
RIGHT_BOTTOM = (700, 500, 950, 780)
CENTRE = (420, 330, 580, 470)


@pytest.mark.parametrize(
    ("reasoning", "box"),
    [
        ("The bipolar forceps is in the upper left of the view.", LEFT_TOP),
        ("The bipolar forceps lies in the left-top quadrant.", LEFT_TOP),
        ("I see the bipolar forceps. It is at the top left, near the border.", LEFT_TOP),
        ("The bipolar_forceps sits in the lower right corner.", RIGHT_BOTTOM),
        ("The bipolar forceps is in the middle of the image.", CENTRE),
        ("The bipolar forceps grasps tissue.", RIGHT_BOTTOM),  # no claim, nothing to contradict
    ],
)
def test_consistent_reasoning_is_coherent(reasoning, box):
    assert check_coherence(reasoning, box, SIZE, "bipolar_forceps").coherent


@pytest.mark.parametrize(
    ("reasoning", "box"),
    [
        ("The bipolar forceps is in the upper left of the view.", RIGHT_BOTTOM),
        ("The bipolar forceps lies in the right-bottom quadrant.", LEFT_TOP),
        ("I see the bipolar forceps. It is on the right side.", LEFT_TOP),
        ("The bipolar forceps is at the bottom.", LEFT_TOP),
        ("The bipolar forceps is in the centre.", LEFT_TOP),
    ],
)
def test_positional_illusion_is_caught(reasoning, box):
    result = check_coherence(reasoning, box, SIZE, "bipolar_forceps")
    assert not result.coherent
    assert result.contradicted


def test_claims_about_other_instruments_are_not_checked_against_the_subject_box():
    reasoning = "A stapler is in the lower right. The bipolar forceps is in the upper left."
    assert check_coherence(reasoning, LEFT_TOP, SIZE, "bipolar_forceps").coherent
    assert not check_coherence(reasoning, LEFT_TOP, SIZE, "stapler").coherent


def test_organ_claims_come_from_sentences_that_name_no_instrument():
    reasoning = "The kidney fills the lower right. A suction tube is in the upper left."
    assert check_coherence(reasoning, RIGHT_BOTTOM, SIZE, None).coherent
    assert not check_coherence(reasoning, LEFT_TOP, SIZE, None).coherent


def test_suction_as_a_state_does_not_switch_the_referent():
    reasoning = "The suction is in the upper left. Fluid is drawn in, so it is performing suction at the top."
    assert len(check_coherence(reasoning, LEFT_TOP, SIZE, "suction").claims) == 2


def test_adjacent_words_form_one_claim_and_word_boundaries_hold():
    assert len(claims_in("It is in the upper left corner.")) == 1
    assert claims_in("Stop, the bottomless topic.") == []


def test_near_the_midline_is_not_a_contradiction():
    just_right = (480, 100, 540, 200)  # centre x = 0.51
    assert check_coherence("The stapler is on the left.", just_right, SIZE, "stapler").coherent


@pytest.mark.parametrize(
    ("box", "words"), [(LEFT_TOP, "upper left"), (RIGHT_BOTTOM, "lower right"), (CENTRE, "centre")]
)
def test_described_position_is_always_coherent_with_its_box(box, words):
    assert describe_position(box, SIZE) == words
    assert check_coherence(f"The stapler is in the {words}.", box, SIZE, "stapler").coherent


def test_centre_as_a_noun_is_not_a_claim():
    assert claims_in("Its box centre lies right of the midline.")[0].horizontal == "right"
    assert len(claims_in("Its box centre lies right of the midline.")) == 1
    assert claims_in("It sits in the centre.")[0].centre


@pytest.mark.parametrize(
    ("reasoning", "state"),
    [
        ("The key cue: its tip presses into the tissue, which means it is performing tissue manipulation.",
         "Tissue_Manipulation"),
        ("Its jaws are closed; that is idle. Then Cutting, now Tool_Manipulation.", "Tool_Manipulation"),
        ("The asked-about suction shows a thin tube; it is not touching anything, so its state is idle.", "Idle"),
        ("Fluid is drawn into its open tip; that is suction.", "Suction"),
        ("Its state is suction, since fluid is drawn into its open tip.", "Suction"),
        ("It is performing cutting: its blades are open over a fresh cut line.", "Cutting"),
        ("A row of staples lines the tissue at its jaws.", None),  # "staples" is not the state "staple"
        ("The suction is in the upper left.", None),  # the instrument, not the state
    ],
)  # fmt: skip
def test_stated_state_is_the_last_state_the_reasoning_names(reasoning, state):
    assert stated_state(reasoning) == state
