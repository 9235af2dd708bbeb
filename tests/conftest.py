"""Shared fixtures: a tiny hand-written dataset in the EndoVis-18-VQLA layout."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

W, H = 320, 256

LABELS = {
    "seq_1": {
        "frame000": [
            "What organ is being operated?|kidney|40,30,300,240",
            "What is the state of bipolar_forceps?|Grasping|10,10,120,100",
            "Where is bipolar_forceps located?|left-top|10,10,120,100",
            "What is the state of suction?|Suction|200,150,310,250",
            "Where is suction located?|right-bottom|200,150,310,250",
        ],
    },
    "seq_2": {
        "frame000": [
            "What organ is being operated?|kidney|40,30,300,240",
            "What is the state of stapler?|Staple|180,20,300,110",
            "Where is stapler located?|right-top|180,20,300,110",
        ],
        "frame001": [
            "What is the state of large_needle_driver?|Suturing|20,140,150,250",
            "Where is large_needle_driver located?|left-bottom|20,140,150,250",
        ],
    },
    "seq_5": {
        "frame000": ["What is the state of clip_applier?|Clipping|100,80,220,200"],
    },
}


def write_dataset(root: Path, labels: dict[str, dict[str, list[str]]] = LABELS) -> Path:
    rng = np.random.default_rng(0)
    for seq, frames in labels.items():
        (root / seq / "left_frames").mkdir(parents=True, exist_ok=True)
        (root / seq / "vqla" / "label").mkdir(parents=True, exist_ok=True)
        for frame, lines in frames.items():
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
                root / seq / "left_frames" / f"{frame}.png"
            )
            (root / seq / "vqla" / "label" / f"{frame}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_vqla(tmp_path: Path) -> Path:
    """Three sequences: seq_1 and seq_5 are EndoVis-18 test sequences, seq_2 a training one."""
    return write_dataset(tmp_path / "vqla")


@pytest.fixture(scope="session", autouse=True)
def fast_dds_files_removed_at_exit():
    """Tests that run ROS clients in the pytest process leave Fast DDS shared-memory files that outlive their
    context; remove the session's own ones when it ends (the files of other live processes stay)."""
    from surgery_r1_ros.bag.ros_env import clean_shm, shm_snapshot

    before = shm_snapshot()
    yield
    clean_shm(before, skip_pid=os.getpid())


@pytest.fixture(scope="session", autouse=True)
def onnx_export_cache(tmp_path_factory):
    """ONNX exports made on demand (backend auto or onnxruntime) go to one folder per test session, not ~/.cache;
    child processes (nodes, demo) inherit it."""
    root = tmp_path_factory.getbasetemp() / "onnx_cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SURGERY_R1_CACHE", str(root))
        yield root
