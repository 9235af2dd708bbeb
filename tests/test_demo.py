"""`surgery-r1 demo` end to end with small settings: the real node and built-in model, then nothing left over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ros_helpers import ros_available

from surgery_r1_ros.bag.ros_env import leftover_shm, shm_snapshot
from surgery_r1_ros.demo import DemoOptions, _child_pids, run_demo

pytestmark = [
    pytest.mark.ros,
    pytest.mark.slow,
    pytest.mark.skipif(not ros_available(), reason="rclpy is not installed"),
]


def test_demo_end_to_end_and_cleanup(tmp_path: Path, capsys) -> None:
    before = shm_snapshot()
    children_before = set(_child_pids())
    out = tmp_path / "demo"
    result = run_demo(DemoOptions(out=out, seconds=1.0, questions=2, size=(320, 256), timeout_s=120))
    printed = capsys.readouterr().out

    # it asked and printed its questions, whatever the built-in model answered
    assert printed.count("Q: ") == 2, printed
    assert "answer:" in printed or "no answer:" in printed
    assert "cleanup: the node and every child process stopped" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["asked"] == 2 and report["model"] == "built-in"
    assert report["metrics"]["frames_played"] == 30
    for name in ("report.md", "answers.png", "answers.jsonl", "logs/node.log"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "frames").glob("*.png"))) == 2
    assert not (out / "bag").exists(), "the generated bag is temporary unless --keep-bag"

    # nothing left running, no Fast DDS files left; the time against the 5-minute budget is printed
    assert result.clean, result.leftovers
    assert set(_child_pids()) <= children_before and not leftover_shm(before)
    assert f"demo finished in {result.seconds:.1f} s" in printed
