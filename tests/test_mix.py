"""The Surgery-R1 training mix: three record kinds, coherent varied reasoning, deterministic."""

from collections import Counter

import pytest

from surgery_r1_ros.coherence import check_coherence, state_mentions
from surgery_r1_ros.data.cues import STATE_CUES
from surgery_r1_ros.data.mix import build_mix, format_mix_counts, read_mix, subject_sentences_start, write_mix
from surgery_r1_ros.data.vqla import load_vqla
from surgery_r1_ros.protocol import PromptMode, build_target, parse_output, target_mode
from surgery_r1_ros.vocab import INSTRUMENTS, STATES, instrument_phrase


def test_every_question_gets_one_record_of_each_kind(tiny_vqla):
    dataset = load_vqla(tiny_vqla)
    records = build_mix(dataset, seed=0)
    assert Counter(r["kind"] for r in records) == {"vqa": 11, "grounding": 11, "cot": 11}
    for record in records:
        mode = target_mode(record["reasoning"], record["box"])
        assert (
            mode is {"vqa": PromptMode.ANSWER, "grounding": PromptMode.GROUND, "cot": PromptMode.REASON}[record["kind"]]
        )
        parsed = parse_output(build_target(record["answer"], record["box"], record["reasoning"]))
        assert parsed.format_ok(mode) and parsed.answer == record["answer"]


def test_reasoning_is_coherent_names_the_subject_and_states_the_answer(tiny_vqla):
    for record in (r for r in build_mix(load_vqla(tiny_vqla)) if r["kind"] == "cot"):
        result = check_coherence(record["reasoning"], record["box"], tuple(record["image_size"]), record["subject"])
        assert result.coherent and result.has_claims, record["reasoning"]
        if record["subject"]:
            assert record["subject"].replace("_", " ") in record["reasoning"]
        assert record["answer"].replace("_", " ").lower() in record["reasoning"].lower()


def test_state_reasoning_names_the_true_state_before_its_cue(tiny_vqla):
    """The state is written where the model still holds what it read from the frame, and the cue after it does
    not name another state (the coherence check's ``stated_state`` reads back the answer)."""
    records = [r for r in build_mix(load_vqla(tiny_vqla)) if r["kind"] == "cot" and r["answer"] in STATES]
    assert records
    for record in records:
        reasoning, state = record["reasoning"], record["answer"]
        assert {named for _, named in state_mentions(reasoning)} == {state}, reasoning  # ("staple marks": Staple)
        cue_at = min(reasoning.find(cue) for cue in STATE_CUES[state] if cue in reasoning)
        assert state_mentions(reasoning)[0][0] < cue_at


def test_subject_sentences_start_where_the_reasoning_first_names_the_subject(tiny_vqla):
    """Box attention looks at the question's box from there on: before it only the organ and the other
    instruments are named, from it on only the subject; organ questions' reasoning has no such sentences."""
    records = [r for r in build_mix(load_vqla(tiny_vqla)) if r["kind"] == "cot"]
    for record in records:
        reasoning, subject = record["reasoning"], record["subject"]
        start = subject_sentences_start(reasoning, subject)
        if subject is None:
            assert start == len(reasoning)
            continue
        before, after = reasoning[:start], reasoning[start:]
        assert before.endswith(".") or start == 0, reasoning
        assert instrument_phrase(subject) in after.split(".")[0]  # its first sentence names it
        assert instrument_phrase(subject) not in before
        others = [instrument_phrase(i) for i in INSTRUMENTS if i != subject]
        assert not any(name in after for name in others), after
    assert {r["subject"] is None for r in records} == {True, False}
    assert subject_sentences_start("The kidney. A grasper.", "bipolar_forceps") == len("The kidney. A grasper.")


def test_reasoning_wording_varies_and_is_deterministic(tiny_vqla):
    dataset = load_vqla(tiny_vqla)
    texts = {seed: [r["reasoning"] for r in build_mix(dataset, seed) if r["kind"] == "cot"] for seed in range(6)}
    assert texts[0] == [r["reasoning"] for r in build_mix(dataset, 0) if r["kind"] == "cot"]
    assert len({t[1] for t in texts.values()}) >= 3


def test_mix_file_round_trip_and_bad_lines(tiny_vqla, tmp_path):
    records = build_mix(load_vqla(tiny_vqla))
    path = write_mix(records, tmp_path / "mix.jsonl")
    assert read_mix(path) == records
    assert "cot" in format_mix_counts(records)
    path.write_text('{"kind": "vqa"}\n')
    with pytest.raises(ValueError, match=r"mix\.jsonl:1: record lacks"):
        read_mix(path)
