"""Dataset pictures and counts: answer counts, the answer histogram and the contact sheet."""

from collections import Counter

import pytest
from PIL import Image

from surgery_r1_ros.data.stats import (
    count_answers,
    format_counts,
    pick_frames,
    write_answer_histogram,
    write_contact_sheet,
)
from surgery_r1_ros.data.synth import SynthOptions, generate_dataset
from surgery_r1_ros.data.vqla import load_vqla
from surgery_r1_ros.vocab import ANSWERS


@pytest.fixture(scope="module")
def synth_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats") / "data"
    generate_dataset(root, SynthOptions(sequences=2, frames_per_sequence=4, seed=2, size=(320, 256)))
    return load_vqla(root, "all")


def test_counts_match_the_label_files(synth_dataset):
    counts = count_answers(synth_dataset)
    by_hand = Counter()
    for label in sorted(synth_dataset.root.glob("seq_*/vqla/label/*.txt")):
        by_hand.update(line.split("|")[1] for line in label.read_text().splitlines() if line)
    assert counts == by_hand
    assert sum(counts.values()) == len(synth_dataset)
    assert counts["kidney"] == len(synth_dataset.frames)


def test_format_counts_is_a_grouped_table(synth_dataset):
    counts = count_answers(synth_dataset)
    text = format_counts(counts)
    for answer in ANSWERS:
        assert answer in text
    for group in ("organ (", "state (", "quadrant ("):
        assert group in text
    assert f"{sum(counts.values())}" in text
    assert "not in the vocabulary" in format_counts(Counter({"kidney": 2, "banana": 1}))
    assert "total" in format_counts(Counter())


def test_histogram_is_a_png(synth_dataset, tmp_path):
    path = write_answer_histogram(synth_dataset, tmp_path / "sub" / "answers.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 700)


def test_contact_sheet_is_a_png_of_spread_frames(synth_dataset, tmp_path):
    frames = synth_dataset.frames  # 2 sequences x 4 frames
    assert pick_frames(synth_dataset, 3) == [frames[0], frames[4], frames[7]]
    assert len(pick_frames(synth_dataset, 100)) == len(synth_dataset.frames)
    first = write_contact_sheet(synth_dataset, tmp_path / "a.png", frames=4)
    second = write_contact_sheet(synth_dataset, tmp_path / "b.png", frames=4)
    assert first.read_bytes() == second.read_bytes()  # same frames, same picture
    with Image.open(first) as image:
        assert image.format == "PNG"
        assert image.size == (2 * 644 + 4, 2 * 516 + 4)


def test_contact_sheet_of_a_hand_written_dataset(tiny_vqla, tmp_path):
    dataset = load_vqla(tiny_vqla, "all")
    path = write_contact_sheet(dataset, tmp_path / "sheet.png", frames=16)
    with Image.open(path) as image:
        assert image.size == (2 * 644 + 4, 2 * 516 + 4)  # 4 frames
    empty = load_vqla(tiny_vqla, "all")
    empty.frames = []
    with pytest.raises(ValueError, match="no frames"):
        write_contact_sheet(empty, tmp_path / "none.png")
