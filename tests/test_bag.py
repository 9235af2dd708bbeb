"""Bag tools without ROS: synth, reading real ``ros2 bag`` recordings, bad input, planning and the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from surgery_r1_ros import cli
from surgery_r1_ros.bag.cdr import decode_image, header_stamp_ns, image_size_from_cdr
from surgery_r1_ros.bag.reader import BagError, BagReader, bag_info
from surgery_r1_ros.bag.synth import (
    BagSynthOptions,
    disparity_px,
    load_questions,
    sidecar_path,
    stamp_ns,
    synth_bag,
)
from surgery_r1_ros.bag_eval import EvalOptions, run_eval
from surgery_r1_ros.bag_eval.plan import image_stamps, plan_questions
from surgery_r1_ros.bag_eval.report import AskedQuestion, EvalReport
from surgery_r1_ros.ros_fields import msg_stamp_ns

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "rosbag2"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"{FIXTURES} is not here (shared/ beside the clone)")
SIZE = (320, 256)
LEFT = "/jhu_daVinci/left/image_raw"


@pytest.fixture(scope="module")
def small_bag(tmp_path_factory) -> Path:
    """1 s of stereo at 320x256 (mcap)."""
    out = tmp_path_factory.mktemp("bags") / "small"
    synth_bag(out, BagSynthOptions(seconds=1.0, size=SIZE, seed=3))
    return out


def test_synth_bag_layout_stamps_stereo_and_sidecar(small_bag: Path) -> None:
    from rosbags.typesys import Stores, get_typestore

    info = bag_info(small_bag)
    assert info.storage == "mcap" and info.version == 9
    names = {t.name: (t.msgtype, t.count) for t in info.topics}
    assert names == {
        "/jhu_daVinci/left/image_raw": ("sensor_msgs/msg/Image", 30),
        "/jhu_daVinci/left/camera_info": ("sensor_msgs/msg/CameraInfo", 30),
        "/jhu_daVinci/right/image_raw": ("sensor_msgs/msg/Image", 30),
        "/jhu_daVinci/right/camera_info": ("sensor_msgs/msg/CameraInfo", 30),
    }
    assert info.topic(LEFT).qos, "the camera QoS profile is recorded for players"
    store = get_typestore(Stores.ROS2_KILTED)
    images: dict[str, list] = {"left": [], "right": []}
    infos = {}
    start = info.start_ns
    with BagReader(small_bag) as bag:
        for msg in bag.messages():
            eye = msg.topic.split("/")[2]
            decoded = store.deserialize_cdr(msg.data, msg.msgtype)
            stamp = msg_stamp_ns(decoded.header.stamp)
            assert stamp == msg.timestamp, "header stamp = bag time"
            assert decoded.header.frame_id == f"jhu_daVinci_{eye}"
            if msg.msgtype.endswith("Image"):
                images[eye].append((stamp, decoded))
                assert header_stamp_ns(msg.data) == stamp
                assert image_size_from_cdr(msg.data) == SIZE
            else:
                infos[eye] = decoded
    # exact 30 Hz stamps, no drift
    assert [s for s, _ in images["left"]] == [stamp_ns(start, i, 30.0) for i in range(30)]
    assert images["left"][-1][0] - start == 966_666_667
    # the right eye is the left one shifted by the disparity; P carries the baseline
    d = disparity_px(SIZE)
    left = images["left"][5][1].data.reshape(SIZE[1], SIZE[0], 3)
    right = images["right"][5][1].data.reshape(SIZE[1], SIZE[0], 3)
    assert d > 0 and np.array_equal(right[:, :-d], left[:, d:])
    fx = infos["left"].k[0]
    assert infos["left"].p[3] == 0 and infos["right"].p[3] == pytest.approx(-fx * 0.005)
    assert infos["left"].width == SIZE[0] and infos["left"].distortion_model == "plumb_bob"
    # ground truth every 0.5 s: frames 0 and 15
    rows = load_questions(sidecar_path(small_bag))
    assert {r["frame"] for r in rows} == {0, 15}
    first = rows[0]
    assert set(first) >= {"stamp", "t", "question", "answer", "box", "image_size", "subject"}
    assert first["question"] == "What organ is being operated?" and first["answer"] == "kidney"
    assert first["subject"] is None and first["image_size"] == list(SIZE)
    later = [r for r in rows if r["frame"] == 15]
    assert later[0]["t"] == pytest.approx(0.5) and later[0]["stamp_ns"] == stamp_ns(start, 15, 30.0)
    assert all(r["subject"] for r in rows if r["kind"] != "organ")


def test_synth_sqlite3_compressed_and_needs_no_ros(tmp_path: Path, small_bag: Path) -> None:
    """`bag synth` must work where ROS is not installed: run it with rclpy made unimportable."""
    out = tmp_path / "sq"
    code = (
        "import argparse, sys; sys.modules['rclpy'] = None\n"
        "from surgery_r1_ros.bag import commands\n"
        "parser = argparse.ArgumentParser(); commands.register(parser.add_subparsers())\n"
        f"args = parser.parse_args(['bag', 'synth', {str(out)!r}, '--storage', 'sqlite3', '--seconds', '0.2',"
        " '--size', '160x128', '--compress', '--mono'])\n"
        "sys.exit(args.handler(args))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    info = bag_info(out)
    assert info.storage == "sqlite3" and info.compression == "message"
    assert [t.name for t in info.topics] == ["/jhu_daVinci/left/image_raw", "/jhu_daVinci/left/camera_info"]
    with BagReader(out) as bag:
        first = next(m for m in bag.messages([LEFT]))
    assert decode_image(first.data).shape == (128, 160, 3)
    # the same seed and size give the same pixels
    again = tmp_path / "again"
    synth_bag(again, BagSynthOptions(seconds=0.1, size=(160, 128), seed=0, stereo=False))
    with BagReader(again) as bag:
        assert next(m for m in bag.messages([LEFT])).data == first.data


@needs_fixtures
def test_reads_real_ros2_bag_recordings() -> None:
    """Old metadata (v4), split files, empty bags and service events: what `ros2 bag` users have."""
    expected = {
        "talker_mcap": 20,  # rosbags' own readers yield 0 of these (QoS differs between yaml and file)
        "talker_sqlite3": 20,
        "wbag_mcap": 6074,  # 5 split files
        "wbag_sqlite3": 6074,
        "empty_bag": 0,
        "bag_with_topics_and_service_events_mcap": 10,  # AnyReader fails on the test_msgs definitions
        "bag_with_topics_and_service_events_sqlite3": 10,
    }
    for name, count in expected.items():
        with BagReader(FIXTURES / name) as bag:
            messages = list(bag.messages())
            assert len(messages) == count == bag.info.message_count, name
            stamps = [m.timestamp for m in messages]
            if name.startswith("talker") or name.startswith("bag_with"):
                assert stamps == sorted(stamps), name
    info = bag_info(FIXTURES / "wbag_mcap")
    assert len(info.files) == 5
    talker = bag_info(FIXTURES / "talker_sqlite3")
    assert talker.version == 4 and {t.name for t in talker.topics} >= {"/topic", "/rosout"}
    with BagReader(FIXTURES / "talker_mcap" / "talker.mcap") as bag:  # a lone storage file
        assert sum(1 for _ in bag.messages(["/topic"])) == 10
    events = bag_info(FIXTURES / "bag_with_topics_and_service_events_mcap")
    assert "test_msgs/srv/BasicTypes_Event" in {t.msgtype for t in events.topics}


def test_bad_bags_give_clear_errors(tmp_path: Path, small_bag: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("surgery_r1_ros.bag.commands",))  # a quick parser
    # missing path / folder without metadata
    with pytest.raises(FileNotFoundError, match="nope"):
        bag_info(tmp_path / "nope")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(BagError, match=r"metadata\.yaml is missing"):
        bag_info(tmp_path / "empty_dir")
    # unknown storage plugin
    odd = tmp_path / "odd"
    shutil.copytree(small_bag, odd)
    meta = odd / "metadata.yaml"
    meta.write_text(meta.read_text().replace("storage_identifier: mcap", "storage_identifier: rosbag_v1_lol"))
    with pytest.raises(BagError, match=r"odd.*rosbag_v1_lol"):
        bag_info(odd)
    # truncated mcap: cut in half
    cut = tmp_path / "cut"
    shutil.copytree(small_bag, cut)
    data_file = next(cut.glob("*.mcap"))
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    with pytest.raises(BagError, match=r"cut.*truncated or corrupt"), BagReader(cut) as bag:
        list(bag.messages())
    # corrupt sqlite3
    junk = tmp_path / "junk"
    synth_bag(junk, BagSynthOptions(seconds=0.1, size=(64, 64), storage="sqlite3", stereo=False))
    db = next(junk.glob("*.db3"))
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(BagError, match=r"junk.*db3"), BagReader(junk) as bag:
        list(bag.messages())
    # unknown topic
    with pytest.raises(BagError, match="/no/such/topic"), BagReader(small_bag) as bag:
        list(bag.messages(["/no/such/topic"]))
    # the CLI: one line naming the bag, exit code 2, no traceback
    for broken in (cut, odd, junk):
        capsys.readouterr()
        assert cli.main(["bag", "info", str(broken)]) == 2
        err = capsys.readouterr().err
        assert str(broken) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # synth refuses to overwrite
    assert cli.main(["bag", "synth", str(small_bag), "--seconds", "0.1"]) == 2
    assert "exists already" in capsys.readouterr().err


def test_questions_file_errors_and_planning(tmp_path: Path, small_bag: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What organ is being operated?", "t": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_questions(bad)
    rows = load_questions(sidecar_path(small_bag))
    stamps, size = image_stamps(small_bag, LEFT)
    assert size == SIZE and len(stamps) == 30
    start = stamps[0]
    extra = [
        {"question": "Where is suction located?", "t": 5.0},  # after the bag
        {"question": "Where is suction located?", "t": -1.0},  # before it
        {"question": "What organ is being operated?", "t": 0.51},  # 10 ms from frame 15: asked
    ]
    questions, groups = plan_questions(rows + extra, stamps, start, 0.05)
    skipped = [q for q in questions if q.skipped]
    assert len(skipped) == 2 and all("outside" in q.skipped for q in skipped)
    assert sorted(groups) == [stamps[0], stamps[15]]
    assert sum(len(g) for g in groups.values()) == len(rows) + 1
    # --max-questions spreads over stamps and kinds
    _, few = plan_questions(rows, stamps, start, 0.05, max_questions=3)
    chosen = [q for g in few.values() for q in g]
    assert len(chosen) == 3 and len(few) == 2
    assert len({q.kind for q in chosen}) >= 2
    # a wrong image topic or a file with nothing askable: clear errors before any ROS process starts
    with pytest.raises(ValueError, match="/nope"):
        image_stamps(small_bag, "/nope")
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"question": "What organ is being operated?", "t": 100.0}) + "\n")
    with pytest.raises(ValueError, match=r"outside.jsonl.*time range"):
        run_eval(small_bag, tmp_path / "report", EvalOptions(questions=outside))
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        run_eval(small_bag, tmp_path / "report", EvalOptions(questions=tmp_path / "missing.jsonl"))


def _q(index, truth, answer, box, truth_box=(0, 0, 100, 100), success=True, kind="state", reasoning="", coherent=True):
    return AskedQuestion(
        index=index,
        question=f"q{index}",
        truth=truth,
        truth_box=list(truth_box),
        image_size=[200, 200],
        stamp_ns=index,
        t=index * 0.5,
        kind=kind,
        asked=True,
        success=success,
        answer=answer if success else "",
        box=list(box) if box else None,
        answered_size=[200, 200],
        reasoning=reasoning,
        coherent=coherent if success else None,
        latency_ms=10.0 * (index + 1),
        round_trip_ms=11.0 * (index + 1),
        error="" if success else "timeout: no response",
    )


def test_report_metrics_and_files(tmp_path: Path) -> None:
    questions = [
        _q(0, "Grasping", "Grasping", (0, 0, 100, 100), reasoning="It is in the upper left.", coherent=True),
        _q(1, "Idle", "Cutting", (0, 0, 50, 100), reasoning="It is on the right.", coherent=False),
        _q(2, "left-top", "", None, success=False, kind="location"),
        AskedQuestion(3, "q3", "kidney", [0, 0, 10, 10], [200, 200], 99, 9.0, skipped="outside the bag's time range"),
    ]
    report = EvalReport("bag", "q.jsonl", "oracle", "start /surgery_r1", "pause", True, questions, frames_played=30)
    report.frames_received = 30
    m = report.metrics()
    assert m["asked"] == 3 and m["answered"] == 2 and m["skipped"] == {"outside the bag's time range": 1}
    assert m["accuracy"] == pytest.approx(1 / 3)  # the failure counts as wrong
    assert m["miou"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # a missing box scores 0
    # legacy: 1 (exact), 0.833 (half box), 0.444 (the missing box is [0,0,0,0]) on normalised boxes
    assert m["miou_legacy"] == pytest.approx((1.0 + 1.875 / 2.25 + 1 / 2.25) / 3)
    assert m["coherence_rate"] == pytest.approx(0.5) and m["n_with_reasoning"] == 2
    assert m["format_rate"] == pytest.approx(2 / 3)  # the failure has no answer
    assert m["latency_ms"]["max"] == pytest.approx(20.0) and m["round_trip_ms"]["n"] == 3
    assert m["errors"] == {"timeout: no response": 1}
    assert m["by_kind"]["state"]["accuracy"] == pytest.approx(0.5)
    frames = {i: np.full((200, 200, 3), 90, np.uint8) for i in range(3)}
    paths = report.write(tmp_path, frames, 12)
    data = json.loads(paths["json"].read_text())
    assert data["metrics"]["accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    md = paths["markdown"].read_text()
    assert "Legacy mIoU" in md and "mIoU (true IoU)" in md and "answers.png" in md
    import cv2

    sheet = cv2.imread(str(paths["sheet"]))
    assert sheet is not None and sheet.shape[1] > 400
    assert len(paths["answers"].read_text().splitlines()) == 4
    assert "asked 3 of 4" in report.summary()
