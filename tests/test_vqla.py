"""The EndoVis-18/17-VQLA loader: layouts, published split, and clear errors for bad input."""

import json

import pytest

from surgery_r1_ros.data.vqla import DatasetError, load_vqla
from surgery_r1_ros.vocab import QuestionKind
from tests.conftest import write_dataset


def test_loads_frames_questions_and_published_split(tiny_vqla):
    everything = load_vqla(tiny_vqla, "all")
    assert len(everything.frames) == 4 and len(everything) == 11
    assert {f.sequence for f in load_vqla(tiny_vqla, "train").frames} == {"seq_2"}
    assert {f.sequence for f in load_vqla(tiny_vqla, "test").frames} == {"seq_1", "seq_5"}
    frame = everything.frames[0]
    assert frame.size == (320, 256)
    qa = frame.qas[1]
    assert (qa.kind, qa.instrument, qa.answer, qa.box) == (
        QuestionKind.STATE,
        "bipolar_forceps",
        "Grasping",
        (10.0, 10.0, 120.0, 100.0),
    )


def test_splits_file_overrides_the_published_split(tiny_vqla):
    (tiny_vqla / "splits.json").write_text(json.dumps({"train": ["seq_1", "seq_5"], "test": ["seq_2"]}))
    assert {f.sequence for f in load_vqla(tiny_vqla, "test").frames} == {"seq_2"}


def test_endovis17_layout_is_a_test_set(tmp_path):
    root = write_dataset(tmp_path / "ev17", {"seq": {"frame1": ["Where is stapler located?|right-top|180,20,300,110"]}})
    flat = tmp_path / "endovis17"
    (root / "seq").rename(flat)
    assert len(load_vqla(flat, "test")) == 1
    with pytest.raises(DatasetError, match="test set"):
        load_vqla(flat, "train")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("What is the state of stapler?|Staple", "expected 'question|answer|x1,y1,x2,y2'"),
        ("What is the state of stapler?|Flying|1,2,3,4", "unknown answer 'Flying'"),
        ("What is the state of stapler?|Staple|50,50,10,10", "inverted"),
        ("What is the state of stapler?|Staple|0,0,400,100", "outside the 320x256 frame"),
        ("What is the state of stapler?|Staple|a,b,c,d", "not four comma-separated numbers"),
        ("What is the state of hammer?|Staple|1,2,3,4", "unknown instrument"),
        ("Where is stapler located?|Staple|1,2,3,4", "does not fit"),
    ],
)
def test_bad_label_line_names_file_line_and_problem(tmp_path, line, message):
    root = write_dataset(
        tmp_path / "bad", {"seq_1": {"frame000": ["What organ is being operated?|kidney|1,1,9,9", line]}}
    )
    with pytest.raises(DatasetError, match=message) as err:
        load_vqla(root)
    assert err.value.line == 2 and err.value.path.name == "frame000.txt"
    skipped = load_vqla(root, skip_bad=True)
    assert len(skipped) == 1 and len(skipped.skipped) == 1


def test_missing_frame_is_an_error_or_counted(tiny_vqla):
    (tiny_vqla / "seq_2" / "left_frames" / "frame001.png").unlink()
    with pytest.raises(DatasetError, match="missing frame frame001"):
        load_vqla(tiny_vqla)
    dataset = load_vqla(tiny_vqla, skip_bad=True)
    assert len(dataset.frames) == 3 and len(dataset.skipped) == 1


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_vqla(tmp_path / "nope")
    with pytest.raises(DatasetError, match="not an EndoVis-VQLA dataset"):
        load_vqla(tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        load_vqla(tmp_path, "validation")
