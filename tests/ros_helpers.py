"""Shared helpers for tests that start real ROS 2 processes, with DDS kept on this machine.

Every ROS process a test starts (and the test process itself, while it talks to them) uses
``ROS_DOMAIN_ID=<random 1..101>`` and Fast DDS's shared-memory transport only
(``FASTDDS_BUILTIN_TRANSPORTS=SHM?...``): no sockets, so nothing leaves the machine, and it is the setting
that carries 1280x1024 frames at 30 Hz. Children are always stopped (SIGINT, then SIGTERM, then SIGKILL)
and the ``/dev/shm/fastdds_*`` files they leave behind are removed. Built on ``surgery_r1_ros.bag.ros_env``
(the same rules for the demo and the bag tools).

Usage::

    with ros_session() as ros:                       # env + test-side rclpy node, spun in a thread
        with ros.process([sys.executable, "-m", "pkg.node"], name="node") as node_proc:
            client = ros.node.create_client(...)
            assert ros.wait_for(lambda: client.service_is_ready(), 20)
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from surgery_r1_ros.bag.ros_env import (
    SHM_TRANSPORT,
    clean_shm,
    safe_dds_env,
    shm_snapshot,
    start_process,
    stop_process,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
wait_for = wait_until


def ros_available() -> bool:
    """Whether rclpy can be imported here (the ROS tests skip cleanly where it cannot)."""
    try:
        import rclpy  # noqa: F401
    except Exception:
        return False
    return True


def ros_env(domain_id: int | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with local-only DDS (``safe_dds_env``), unbuffered output and tests/ importable
    (for fault-injection engine classes given to the node as ``backend:=module:Class``)."""
    env = safe_dds_env(domain_id)
    env["PYTHONUNBUFFERED"] = "1"
    env["RCUTILS_COLORIZED_OUTPUT"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    if extra:
        env.update(extra)
    return env


class RosProcess:
    """A child process in its own session with its output in a log file; ``stop()`` always ends it."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log_path: Path, name: str = "ros") -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self.popen = start_process(self.cmd, env, log_path, cwd=REPO_ROOT)
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_output(self, text: str, timeout: float) -> bool:
        """Wait until ``text`` appears in the output (False on timeout or if the process ended first)."""
        wait_for(lambda: text in self.output() or not self.alive(), timeout)
        return text in self.output()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT (rclpy shuts down cleanly), then SIGTERM, then SIGKILL; returns the exit code."""
        if self.returncode is None:
            self.returncode = stop_process(self.popen, timeout)
        return self.returncode


class RosSession:
    """Environment, child processes and (optionally) an rclpy node of the test process, all torn down."""

    def __init__(self, log_dir: Path, domain_id: int | None = None) -> None:
        self.env = ros_env(domain_id)
        self.domain_id = int(self.env["ROS_DOMAIN_ID"])
        self.log_dir = log_dir
        self.processes: list[RosProcess] = []
        self.context = None
        self.node = None
        self.executor = None
        self._thread: threading.Thread | None = None

    # child processes
    def start(self, cmd: Sequence[str], name: str = "ros") -> RosProcess:
        proc = RosProcess(cmd, self.env, self.log_dir / f"{name}-{len(self.processes)}.log", name)
        self.processes.append(proc)
        return proc

    @contextlib.contextmanager
    def process(self, cmd: Sequence[str], name: str = "ros") -> Iterator[RosProcess]:
        proc = self.start(cmd, name)
        try:
            yield proc
        finally:
            proc.stop()

    def python(self, args: Sequence[str], name: str = "ros") -> RosProcess:
        """Start ``python <args>`` with this interpreter."""
        return self.start([sys.executable, *args], name)

    # the test process's own rclpy node
    def start_node(self, name: str = "test_client"):
        """Create an rclpy context (this session's domain) and a node spun by a background thread."""
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self._saved_env = {k: os.environ.get(k) for k in ("ROS_DOMAIN_ID", "FASTDDS_BUILTIN_TRANSPORTS")}
        os.environ["ROS_DOMAIN_ID"] = str(self.domain_id)
        os.environ["FASTDDS_BUILTIN_TRANSPORTS"] = SHM_TRANSPORT
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=self.domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name="test-executor", daemon=True)
        self._thread.start()
        return self.node

    def _spin(self) -> None:
        with contextlib.suppress(Exception):
            while self.context.ok():
                self.executor.spin_once(timeout_sec=0.05)

    def call(self, client, request, timeout: float = 30.0):
        """A service call from the test node; None on timeout."""
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(timeout):
            client.remove_pending_request(future)
            return None
        return future.result()

    def stop_node(self) -> None:
        if self.context is None:
            return
        import rclpy

        with contextlib.suppress(Exception):
            rclpy.shutdown(context=self.context)
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(Exception):
            self.executor.shutdown(timeout_sec=1)
        with contextlib.suppress(Exception):
            self.node.destroy_node()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.context = self.node = self.executor = None

    def close(self) -> None:
        self.stop_node()
        for proc in self.processes:
            proc.stop()


@contextlib.contextmanager
def ros_session(log_dir: Path, domain_id: int | None = None, client_node: str | None = "test_client"):
    """A RosSession whose processes are stopped and whose leftover Fast DDS files are removed at exit."""
    before = shm_snapshot()
    session = RosSession(log_dir, domain_id)
    try:
        if client_node:
            session.start_node(client_node)
        yield session
    finally:
        session.close()
        clean_shm(before)
