"""The README's ROS 2 workspace build: colcon builds both packages from ws/src, and the installed node answers.

The repository's working tree (tracked and untracked files, as on disk) is copied to ``<ws>/src/surgery_r1_ros``
as a ``git clone`` would place it, the README's ``colcon build`` line runs in ``<ws>`` (this venv's colcon and
the ROS 2 wheels, as with an activated venv), and the ``surgery_r1_node`` that ``ros2 run`` would start is run
from ``install/`` with ``install/setup.bash`` sourced. It answers a question about a published frame with the
built-in model.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ros_helpers import REPO_ROOT, ros_available, ros_session, wait_for
from test_node import TOPIC, Rig

VENV_BIN = Path(sys.executable).parent
PACKAGE = "surgery_r1_ros"

pytestmark = [
    pytest.mark.ros,
    pytest.mark.slow,
    pytest.mark.skipif(not ros_available(), reason="rclpy is not installed"),
    pytest.mark.skipif(not (VENV_BIN / "colcon").exists(), reason="colcon-common-extensions is not installed"),
    pytest.mark.skipif(not (REPO_ROOT / ".git").exists(), reason="not a git checkout"),
    pytest.mark.timeout(1800),
]


def readme_colcon_command() -> str:
    """The ``colcon build`` line of the README's "Build in a ROS 2 workspace" section."""
    section = (REPO_ROOT / "README.md").read_text().split("### Build in a ROS 2 workspace", 1)[1].split("\n### ", 1)[0]
    commands = re.findall(r"^colcon build .*$", section, flags=re.MULTILINE)
    assert len(commands) == 1, f"expected one colcon build line in the README section, found {commands}"
    return commands[0]


def copy_working_tree(dest: Path) -> None:
    """The files a clone would hold, as they are on disk now (uncommitted edits and new files included)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():  # a tracked file deleted on disk is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def activated_venv_env() -> dict[str, str]:
    """This environment with the venv's bin first on PATH, as after ``source .venv/bin/activate``."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    return env


def sourced(ws: Path, command: str) -> str:
    """``command`` in bash, in the workspace folder with ``install/setup.bash`` sourced (as a user runs it)."""
    return f'cd "{ws}" && source install/setup.bash && {command}'


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A workspace with this repository in src/, built with the README's colcon command."""
    ws = tmp_path_factory.mktemp("ros2_ws")
    copy_working_tree(ws / "src" / PACKAGE)
    env = activated_venv_env() | {"COLCON_HOME": str(ws / ".colcon")}  # no user-wide colcon defaults
    build = subprocess.run(
        ["bash", "-c", readme_colcon_command()], cwd=ws, env=env,
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert build.returncode == 0, f"colcon build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    assert "2 packages finished" in build.stdout, build.stdout[-2000:]
    return ws


def test_both_packages_installed(workspace: Path) -> None:
    """What ``ros2 run`` and ``ros2 launch`` look up is in the install tree, and sourcing it selects it."""
    prefix = workspace / "install" / PACKAGE
    share = prefix / "share" / PACKAGE
    node = prefix / "lib" / PACKAGE / "surgery_r1_node"
    assert node.is_file() and os.access(node, os.X_OK)
    for folder, pattern in (("launch", "*launch.py"), ("config", "*.yaml")):
        wanted = sorted(p.name for p in (REPO_ROOT / folder).glob(pattern))
        assert wanted and sorted(p.name for p in (share / folder).glob(pattern)) == wanted, folder
    assert (share / "package.xml").is_file()
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE).is_file()
    interfaces = workspace / "install" / "surgery_r1_interfaces"
    assert (interfaces / "share" / "surgery_r1_interfaces" / "srv" / "AskQuestion.srv").is_file()

    probe = (
        "import surgery_r1_interfaces.srv, surgery_r1_ros; "
        "print(surgery_r1_interfaces.srv.__file__); print(surgery_r1_ros.__file__)"
    )
    out = subprocess.run(
        ["bash", "-c", sourced(workspace, f'echo "$AMENT_PREFIX_PATH" && python -c "{probe}"')],
        env=activated_venv_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    prefixes, srv_file, pkg_file = out.stdout.split()
    assert set(prefixes.split(":")) >= {str(prefix), str(interfaces)}
    assert srv_file.startswith(str(interfaces)), srv_file  # not the venv's pip-built copy
    assert pkg_file.startswith(str(prefix)), pkg_file  # not the editable checkout


def test_installed_node_answers(workspace: Path, tmp_path: Path) -> None:
    """The installed surgery_r1_node, started with the workspace sourced, answers ~/ask about a published frame."""
    node_exe = workspace / "install" / PACKAGE / "lib" / PACKAGE / "surgery_r1_node"
    with ros_session(tmp_path) as ros:
        ros.env.update({k: v for k, v in activated_venv_env().items() if k in ("PATH", "VIRTUAL_ENV")})
        args = f"--ros-args -p image_topic:={TOPIC} -p device:=cpu -p max_new_tokens:=16 -p warmup:=false"
        node = ros.start(["bash", "-c", sourced(workspace, f'exec "{node_exe}" {args}')], name="installed_node")
        rig = Rig(ros)
        assert rig.client.wait_for_service(timeout_sec=180), f"no ~/ask service:\n{node.output()[-3000:]}"
        assert wait_for(lambda: rig.camera.get_subscription_count() > 0, 60), node.output()[-3000:]
        rig.publish(40.0, width=320, height=256)
        response = rig.ask_when_ready(40.0, question="Where is bipolar_forceps located?", timeout=180)
        # the built-in model may give no readable answer; either way it ran on this frame in the installed node
        assert response.success or response.error.startswith("the model gave no readable answer"), response.error
        assert response.image_header.stamp.sec == 40 and response.inference_ms > 0
        assert node.alive(), node.output()[-3000:]
