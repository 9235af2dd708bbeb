"""`bag eval` end to end against the real node process, with an engine that knows the answers.

The oracle engine (tests/bag_oracle.py) answers each frame's ground truth, found by hashing the frame,
so a correct pipeline (stamps, frame choice, box mapping, metrics) must score accuracy 1 and IoU 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ros_helpers import TESTS_DIR, ros_available, ros_session

from surgery_r1_ros.bag.cdr import decode_image, header_stamp_ns
from surgery_r1_ros.bag.reader import BagReader
from surgery_r1_ros.bag.ros_env import group_alive, leftover_shm, safe_dds, shm_snapshot
from surgery_r1_ros.bag.synth import BagSynthOptions, load_questions, sidecar_path, synth_bag
from surgery_r1_ros.bag_eval import EvalOptions, run_eval

pytestmark = [
    pytest.mark.ros,
    pytest.mark.skipif(not ros_available(), reason="rclpy is not installed"),
]
LEFT = "/jhu_daVinci/left/image_raw"
ORACLE = {"backend": "bag_oracle:OracleEngine", "warmup": "false"}


def _oracle_table(bag: Path, path: Path) -> Path:
    from bag_oracle import frame_key

    rows = load_questions(sidecar_path(bag))
    by_stamp: dict[int, dict] = {}
    for row in rows:
        by_stamp.setdefault(row["stamp_ns"], {})[row["question"]] = [row["answer"], row["box"]]
    table = {}
    with BagReader(bag) as reader:
        for msg in reader.messages([LEFT]):
            answers = by_stamp.get(header_stamp_ns(msg.data))
            if answers:
                table[frame_key(decode_image(msg.data))] = answers
    path.write_text(json.dumps(table))
    return path


def test_eval_with_oracle_engine_start_and_running(tmp_path: Path, monkeypatch) -> None:
    bag = tmp_path / "bag"
    synth_bag(bag, BagSynthOptions(seconds=1.2, size=(320, 256), seed=5))
    n_questions = len(load_questions(sidecar_path(bag)))
    monkeypatch.setenv("BAG_ORACLE_TABLE", str(_oracle_table(bag, tmp_path / "oracle.json")))
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    before = shm_snapshot()

    # --node start, pause pace: every question answered about its own frame
    result = run_eval(
        bag, tmp_path / "start", EvalOptions(node="start", node_params=ORACLE, startup_timeout_s=90, timeout_s=20)
    )
    print(result.report.summary())
    m = result.report.metrics()
    assert m["asked"] == m["answered"] == n_questions, result.report.summary()
    assert m["accuracy"] == 1.0 and m["f_score"] == 1.0
    assert m["miou"] == pytest.approx(1.0) and m["miou_legacy"] == pytest.approx(1.0)
    assert m["coherence_rate"] == m["claimed_coherence_rate"] == m["subject_rate"] == 1.0  # it names its subject
    assert "names the asked instrument 1.000" in result.report.summary()
    assert m["state_claims_rate"] == m["state_claim_accuracy"] == m["state_agreement_rate"] == 1.0
    assert "names the right state 1.000  answers the state it names 1.000" in result.report.summary()
    assert m["frames_played"] == 36
    assert m["frames_received"] is not None and m["frames_received"] >= 34, m  # best effort may drop a first frame
    latency = m["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["max"], latency  # speed itself: benchmarks/, not tests
    for name in ("report.json", "report.md", "answers.jsonl", "answers.png"):
        assert (tmp_path / "start" / name).stat().st_size > 0
    report = json.loads((tmp_path / "start" / "report.json").read_text())
    assert report["metrics"]["accuracy"] == 1.0 and report["pace"] == "pause"
    assert "| Accuracy | 1.000 |" in (tmp_path / "start" / "report.md").read_text()
    assert not leftover_shm(before), "the node we started left Fast DDS files behind"

    # --node running, realtime pace: the bag plays at its own speed while the questions are asked
    with ros_session(tmp_path, client_node=None) as ros:
        node = ros.start(
            [
                sys.executable,
                "-m",
                "surgery_r1_ros.node.node",
                "--ros-args",
                *[a for k, v in ORACLE.items() for a in ("-p", f"{k}:={v}")],
            ],
            name="node",
        )
        with safe_dds(ros.domain_id):
            live = run_eval(
                bag,
                tmp_path / "running",
                EvalOptions(node="running", pace="realtime", startup_timeout_s=60, timeout_s=20, reasoning=False),
            )
        assert node.alive(), "eval must not stop a node it did not start"
        pid = node.pid
    assert not group_alive(pid)
    print(live.report.summary())
    lm = live.report.metrics()
    assert lm["asked"] == n_questions
    # at 30 Hz with a 10-frame buffer, an instant engine answers nearly everything; a first frame may be lost
    assert lm["answered"] >= n_questions // 2, live.report.summary()
    answered = [q for q in live.report.questions if q.success]
    assert all(q.correct for q in answered) and all(q.reasoning == "" for q in answered)
    assert live.report.pace == "realtime" and "running" in live.report.node
