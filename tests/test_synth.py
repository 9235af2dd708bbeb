"""The synthetic scene generator: EndoVis-18-VQLA layout, valid labels, determinism, smooth video, CLI."""

import itertools
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from surgery_r1_ros.boxes import quadrant_of
from surgery_r1_ros.cli import main
from surgery_r1_ros.data.cues import INSTRUMENT_STATES
from surgery_r1_ros.data.synth import (
    FrameTruth,
    SynthOptions,
    generate_dataset,
    render_sequence,
    split_sequences,
)
from surgery_r1_ros.data.synth.png import encode_png
from surgery_r1_ros.data.synth.scene import visible_box
from surgery_r1_ros.data.vqla import load_vqla
from surgery_r1_ros.vocab import ANSWERS, INSTRUMENTS, QUADRANTS, QuestionKind

SIZE = (320, 256)
OPTIONS = SynthOptions(sequences=3, frames_per_sequence=5, seed=7, size=SIZE, test_fraction=0.34)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    report = generate_dataset(root, OPTIONS)
    assert report.frames == 15 and report.qa_pairs > 15
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_endovis18_and_loads(synth_root):
    for seq in ("seq_1", "seq_2", "seq_3"):
        frames = sorted((synth_root / seq / "left_frames").glob("*.png"))
        labels = sorted((synth_root / seq / "vqla" / "label").glob("*.txt"))
        assert [p.stem for p in frames] == [f"frame{k:03d}" for k in range(5)] == [p.stem for p in labels]
    dataset = load_vqla(synth_root, "all")
    assert len(dataset.frames) == 15 and not dataset.skipped
    assert all(f.size == SIZE for f in dataset.frames)
    assert len(dataset) == sum(len(f.qas) for f in dataset.frames)
    image = cv2.imread(str(dataset.frames[0].image_path))
    assert image.shape == (SIZE[1], SIZE[0], 3)


def test_dense_truth_matches_the_label_boxes(synth_root):
    """Every label box is the bounding box of its instrument's pixels in the dense mask, except where a tool
    drawn in front hides part of it (the label box, like EndoVis, is the whole visible instrument)."""
    from surgery_r1_ros.data.synth import DENSE_DIR, ORGAN_LABEL

    checked = occluded = 0
    for mask_path in sorted(synth_root.glob(f"seq_*/vqla/{DENSE_DIR}/*.png")):
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        record = json.loads(mask_path.with_suffix(".json").read_text())
        labels = (mask_path.parents[1] / "label" / f"{mask_path.stem}.txt").read_text().splitlines()
        assert mask.shape == (SIZE[1], SIZE[0]) and mask.dtype == np.uint8 and mask.max() <= ORGAN_LABEL
        assert record["mask_values"][str(ORGAN_LABEL)] == "kidney"
        for inst in record["instruments"]:
            assert f"What is the state of {inst['name']}?|{inst['state']}|" + ",".join(map(str, inst["box"])) in labels
            ys, xs = np.nonzero(mask == INSTRUMENTS.index(inst["name"]) + 1)
            found = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            if max(abs(a - b) for a, b in zip(found, inst["box"], strict=True)) <= 2:  # rasterisation
                checked += 1
            else:  # hidden behind another tool: its pixels lie inside the box, and another tool covers the rest
                x1, y1, x2, y2 = inst["box"]
                assert x1 - 2 <= found[0] and y1 - 2 <= found[1] and found[2] <= x2 + 2 and found[3] <= y2 + 2
                assert len(record["instruments"]) > 1
                occluded += 1
    assert checked >= 10 and occluded <= checked // 4


def test_every_label_line_is_valid(synth_root):
    for frame in load_vqla(synth_root, "all").frames:
        organ = [qa for qa in frame.qas if qa.kind is QuestionKind.ORGAN]
        assert len(organ) == 1 and organ[0].answer == "kidney" and frame.qas[0].kind is QuestionKind.ORGAN
        by_instrument: dict[str, dict] = {}
        for qa in frame.qas:
            assert qa.answer in ANSWERS
            x1, y1, x2, y2 = qa.box
            assert 0 <= x1 < x2 <= SIZE[0] and 0 <= y1 < y2 <= SIZE[1]
            if qa.kind is QuestionKind.ORGAN:
                continue
            by_instrument.setdefault(qa.instrument, {})[qa.kind] = qa
        assert 1 <= len(by_instrument) <= 3
        for instrument, qas in by_instrument.items():
            state, where = qas[QuestionKind.STATE], qas[QuestionKind.LOCATION]
            assert state.answer in INSTRUMENT_STATES[instrument]
            assert where.answer in QUADRANTS and where.answer == quadrant_of(where.box, SIZE)
            assert state.box == where.box


def test_label_file_text_matches_truth():
    frame, truth = next(render_sequence(3, 1, SIZE))
    lines = truth.qa_lines()
    assert len(lines) == 1 + 2 * len(truth.instruments)
    assert lines[0] == f"What organ is being operated?|kidney|{','.join(map(str, truth.organ_box))}"
    for line, (q, a, b) in zip(lines, truth.qas(), strict=True):
        assert line == f"{q}|{a}|{b[0]},{b[1]},{b[2]},{b[3]}"
    assert frame.dtype == np.uint8 and frame.shape == (SIZE[1], SIZE[0], 3)
    assert [i.name for i in truth.instruments] == sorted((i.name for i in truth.instruments), key=INSTRUMENTS.index)


def test_same_seed_same_bytes_other_seed_differs(synth_root, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, OPTIONS)
    assert _files(again) == _files(synth_root)
    other = tmp_path / "other"
    generate_dataset(other, SynthOptions(**{**OPTIONS.__dict__, "seed": 8}))
    a, b = _files(synth_root), _files(other)
    assert a.keys() == b.keys()
    assert a["seq_1/left_frames/frame000.png"] != b["seq_1/left_frames/frame000.png"]


def test_render_sequence_is_deterministic():
    first = list(render_sequence(11, 4, SIZE, "hard"))
    second = list(render_sequence(11, 4, SIZE, "hard"))
    for (fa, ta), (fb, tb) in zip(first, second, strict=True):
        assert np.array_equal(fa, fb) and ta == tb
    other = next(render_sequence(12, 1, SIZE, "hard"))[0]
    assert not np.array_equal(first[0][0], other)


def test_workers_give_the_same_output(synth_root, tmp_path):
    parallel = tmp_path / "parallel"
    generate_dataset(parallel, OPTIONS, workers=2)
    assert _files(parallel) == _files(synth_root)


def test_continuous_video_moves_smoothly():
    truths: list[FrameTruth] = [t for _, t in render_sequence(5, 90, SIZE)]
    steps, moved = [], 0.0
    for prev, cur in itertools.pairwise(truths):
        before = {i.name: i for i in prev.instruments}
        for inst in cur.instruments:
            if inst.name in before:
                (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = before[inst.name].box, inst.box
                step = np.hypot((ax1 + ax2 - bx1 - bx2) / 2, (ay1 + ay2 - by1 - by2) / 2)
                steps.append(step)
                moved += np.hypot(inst.tip[0] - before[inst.name].tip[0], inst.tip[1] - before[inst.name].tip[1])
    assert steps, "no instrument stayed in view for two frames"
    assert max(steps) < 0.08 * SIZE[0], max(steps)
    assert np.mean(steps) < 0.015 * SIZE[0]
    assert moved > 0.05 * SIZE[0]  # it is a video, not a still
    states = {(i.name, i.state) for t in truths for i in t.instruments}
    names = {i.name for t in truths for i in t.instruments}
    assert len(states) > len(names)  # states change over three seconds


def test_independent_frames_cover_every_instrument_state():
    seen: Counter = Counter()
    counts = Counter()
    for _, truth in render_sequence(21, 400, (160, 128), "easy", continuous=False):
        assert 1 <= len(truth.instruments) <= 3
        assert len({i.name for i in truth.instruments}) == len(truth.instruments)  # each at most once
        counts[len(truth.instruments)] += 1
        for inst in truth.instruments:
            assert inst.state in INSTRUMENT_STATES[inst.name]
            seen[(inst.name, inst.state)] += 1
    wanted = {(name, state) for name, states in INSTRUMENT_STATES.items() for state in states}
    assert set(seen) == wanted
    assert set(counts) == {1, 2, 3}


@pytest.mark.parametrize("difficulty", ["easy", "normal", "hard"])
def test_difficulties_render(difficulty):
    frame, truth = next(render_sequence(2, 1, SIZE, difficulty))
    assert frame.shape == (SIZE[1], SIZE[0], 3) and truth.instruments
    assert 40 < frame.mean() < 220  # neither black nor washed out


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="difficulty"):
        next(render_sequence(0, 1, SIZE, "impossible"))
    with pytest.raises(ValueError, match="test_fraction"):
        generate_dataset(tmp_path / "x", SynthOptions(2, 2, size=SIZE, test_fraction=1.0))
    with pytest.raises(ValueError, match="sequences"):
        generate_dataset(tmp_path / "y", SynthOptions(0, 2, size=SIZE))


def test_splits_partition_the_sequences(synth_root):
    splits = json.loads((synth_root / "splits.json").read_text())
    assert sorted(splits["train"] + splits["test"]) == ["seq_1", "seq_2", "seq_3"]
    assert len(splits["test"]) == 1 and not set(splits["train"]) & set(splits["test"])
    assert {f.sequence for f in load_vqla(synth_root, "test").frames} == set(splits["test"])
    assert {f.sequence for f in load_vqla(synth_root, "train").frames} == set(splits["train"])
    names = [f"seq_{i}" for i in range(1, 9)]
    train, test = split_sequences(names, 0.25, seed=1)
    assert len(test) == 2 and sorted(train + test, key=names.index) == names
    assert split_sequences(names[:2], 0.01, seed=1)[1]  # at least one test sequence
    assert split_sequences(names[:1], 0.5, seed=1) == (["seq_1"], [])
    assert split_sequences(names, 0.0, seed=1) == (names, [])


def test_refuses_a_foreign_folder_and_overwrites_its_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_dataset(foreign, SynthOptions(1, 1, size=SIZE))
    assert (foreign / "notes.txt").read_text() == "mine"

    ours = tmp_path / "ours"
    generate_dataset(ours, SynthOptions(3, 2, size=SIZE))
    report = generate_dataset(ours, SynthOptions(2, 1, seed=4, size=SIZE))
    assert sorted(p.name for p in ours.iterdir() if p.is_dir()) == ["seq_1", "seq_2"]
    assert len(load_vqla(ours, "all").frames) == report.frames == 2
    assert "frames/s" in report.summary() and "QA pairs" in report.summary()


def test_visible_box_clips_to_the_frame():
    shaft = np.array([[100.0, 100.0], [500.0, 100.0], [500.0, 140.0], [100.0, 140.0]])
    assert visible_box([shaft], (320, 256)) == (100, 100, 320, 140)
    corner = np.array([[-50.0, -50.0], [50.0, -50.0], [50.0, 50.0], [-50.0, 50.0]])
    assert visible_box([corner], (320, 256)) == (0, 0, 50, 50)
    assert visible_box([corner - 200], (320, 256)) is None
    around = np.array([[-10.0, -10.0], [400.0, -10.0], [400.0, 300.0], [-10.0, 300.0]])
    assert visible_box([around], (320, 256)) == (0, 0, 320, 256)


def test_png_round_trip():
    frame = next(render_sequence(1, 1, SIZE))[0]
    decoded = cv2.imdecode(np.frombuffer(encode_png(frame), np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), frame)


def test_cli_synth_check_stats(tmp_path, capsys):
    data, pictures = tmp_path / "data", tmp_path / "pictures"
    assert main(["data", "synth", "--out", str(data), "--sequences", "2", "--frames-per-sequence", "3",
                 "--size", "320x256", "--seed", "5", "--difficulty", "easy"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "frames/s" in out and "1 train / 1 test sequences in" in out and "splits.json" in out
    assert "seq_" not in out  # no sequence names: a large dataset has thousands
    assert main(["data", "check", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "6 frames" in out and "kidney" in out
    assert main(["data", "stats", "--data", str(data), "--out", str(pictures), "--frames", "4"]) == 0
    for name in ("answers.png", "contact_sheet.png"):
        assert (pictures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["data", "synth", "--out", str(pictures), "--sequences", "1", "--frames-per-sequence", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
