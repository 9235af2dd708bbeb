"""cmake/ros_wheels.cmake: the PyPI ROS 2 wheels are used only when no ROS 2 install is sourced.

A one-line CMake project includes the file and reports what it decided, for the three cases a user meets:
nothing sourced (colcon or pip in the venv), the ROS 2 install that provides ament_package sourced (apt: it
must change nothing), and only a workspace overlay sourced (rebuilding after ``source install/setup.bash``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CMAKE = VENV_BIN / "cmake"

pytestmark = pytest.mark.skipif(not CMAKE.exists(), reason="cmake is not installed in this environment")

PROBE = """cmake_minimum_required(VERSION 3.22)
project(probe NONE)
include("{cmake_file}")
surgery_r1_find_ros_wheels()
message(STATUS "probe|${{SURGERY_R1_ROS_WHEELS}}|${{CMAKE_PREFIX_PATH}}|$ENV{{AMENT_PREFIX_PATH}}")
"""


def wheels_prefix() -> str | None:
    try:
        import ament_package
    except ImportError:
        return None
    return Path(ament_package.__file__).resolve().parents[4].as_posix()


def probe(folder: Path, ament_prefix_path: str) -> tuple[bool, str, str]:
    """(wheels used, CMAKE_PREFIX_PATH, AMENT_PREFIX_PATH) after the file ran, with the given AMENT_PREFIX_PATH."""
    folder.mkdir()
    (folder / "CMakeLists.txt").write_text(
        PROBE.format(cmake_file=ROOT / "surgery_r1_interfaces" / "cmake" / "ros_wheels.cmake")
    )
    env = dict(os.environ, AMENT_PREFIX_PATH=ament_prefix_path)
    out = subprocess.run(
        [str(CMAKE), "-S", str(folder), "-B", str(folder / "build"), f"-DPython3_EXECUTABLE={sys.executable}"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(line for line in out.stdout.splitlines() if "probe|" in line)
    _, used, prefix_path, ament = line.split("|")
    return used == "TRUE", prefix_path, ament


@pytest.mark.skipif(wheels_prefix() is None, reason="the ROS 2 wheels are not installed")
def test_wheels_used_only_without_a_sourced_ros(tmp_path: Path) -> None:
    prefix = wheels_prefix()
    assert prefix is not None
    # nothing sourced: the wheels' prefix is found and put where ament and rosidl look
    assert probe(tmp_path / "bare", "") == (True, prefix, prefix)
    # the install that provides ament_package is sourced (as /opt/ros/<distro> is): nothing changes
    assert probe(tmp_path / "sourced", prefix) == (False, "", prefix)
    # only an overlay sourced: the wheels still come in, after the overlay
    overlay = str(tmp_path)
    assert probe(tmp_path / "overlay", overlay) == (True, prefix, f"{overlay}:{prefix}")
