"""The one output protocol: targets round-trip through the parser; junk is a format failure, not a crash."""

import pytest

from surgery_r1_ros.protocol import (
    PromptMode,
    build_messages,
    build_target,
    format_box,
    parse_output,
    prompt_text,
    target_mode,
)


@pytest.mark.parametrize(
    ("answer", "box", "reasoning", "mode"),
    [
        ("Grasping", None, None, PromptMode.ANSWER),
        ("left-top", (10, 20, 110, 220), None, PromptMode.GROUND),
        ("kidney", (0, 5, 279, 223), "The organ fills the lower right. It is the kidney.", PromptMode.REASON),
    ],
)
def test_target_round_trips(answer, box, reasoning, mode):
    text = build_target(answer, box, reasoning)
    parsed = parse_output(text)
    assert target_mode(reasoning, box) is mode
    assert parsed.answer == answer
    assert parsed.box == (tuple(float(v) for v in box) if box else None)
    assert parsed.reasoning == reasoning
    assert parsed.format_ok(mode)


def test_box_is_written_in_whole_zero_padded_pixels():
    assert build_target("Idle", (10.4, 20.6, 130.0, 4.5)).endswith("<box>[010,021,130,004]</box>")


def test_box_digits_go_in_place_value_order():
    """Padded box text sorts like the numbers it writes: each digit a model writes is one place value."""
    values = [0, 7, 9, 10, 16, 74, 99, 100, 166, 280, 336, 999]
    texts = [format_box((v, v, v, v)) for v in values]
    assert texts == sorted(texts)
    parsed = [parse_output(f"<answer>Idle</answer><box>{t}</box>").box for t in texts]
    assert parsed == [(float(v),) * 4 for v in values]


def test_reasoning_needs_a_box():
    with pytest.raises(ValueError, match="box"):
        build_target("Idle", None, "some reasoning")


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "garbage <answer>",
        "<answer>Flying</answer><box>[1,2,3,4]</box>",
        "<answer>Idle</answer><box>[1,2,3]</box>",
        "<answer>Idle</answer><box>[30,2,3,4]</box>",
        "<think>unterminated <answer>Idle</answer>",
        "\x00\xff<box>nan</box>",
    ],
)
def test_junk_is_a_format_failure_not_an_exception(junk):
    parsed = parse_output(junk)
    assert not parsed.format_ok(PromptMode.GROUND)
    assert parsed.problems


def test_parser_tolerates_case_spacing_and_surrounding_text():
    parsed = parse_output("Sure! <answer> tissue manipulation </answer> then <box>( 1, 2 , 30, 40 )</box> bye")
    assert parsed.answer == "Tissue_Manipulation"
    assert parsed.box == (1.0, 2.0, 30.0, 40.0)
    assert parsed.format_ok(PromptMode.GROUND)
    assert not parsed.format_ok(PromptMode.REASON)


def test_unknown_label_is_kept_but_not_well_formed():
    parsed = parse_output("<answer>Dancing</answer><box>[1,2,3,4]</box>")
    assert parsed.answer == "Dancing"
    assert not parsed.answer_in_vocabulary
    assert not parsed.format_ok(PromptMode.ANSWER)


def test_messages_put_the_image_before_the_question():
    messages = build_messages("Where is stapler located?", PromptMode.GROUND)
    content = messages[0]["content"]
    assert content[0]["type"] == "image"
    assert content[1]["text"] == prompt_text("Where is stapler located?", PromptMode.GROUND)
    assert {PromptMode.for_request(True), PromptMode.for_request(False)} == {PromptMode.REASON, PromptMode.GROUND}
