"""Keep DDS on this machine and clean up after the ROS processes we start (demo, eval, tests).

Fast DDS discovery multicasts on every interface by default. Everything *we* start for a demo, an
evaluation or a test gets a random domain and the shared-memory-only transport, which also is the
only setting that delivers 30 Hz full-size images best effort. The node itself never forces these:
on a real dVRK the camera may be on another computer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SHM_TRANSPORT = "SHM?max_msg_size=8MB&sockets_size=32MB"
SHM_DIR = Path("/dev/shm")
SHM_PREFIXES = ("fastdds_", "sem.fastdds_")  # segments and their named semaphores (port mutexes)


def safe_dds_env(domain_id: int | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default: os.environ) with a random domain 1..101 and shared-memory-only DDS.

    The rest of the environment passes through unchanged: the ROS wheels' bootstrap needs it.
    """
    env = dict(os.environ if base is None else base)
    env["ROS_DOMAIN_ID"] = str(domain_id if domain_id is not None else random.randint(1, 101))
    env["FASTDDS_BUILTIN_TRANSPORTS"] = SHM_TRANSPORT
    # LOCALHOST discovery range makes Fast DDS ignore the builtin-transports choice; SHM is local anyway.
    env.pop("ROS_AUTOMATIC_DISCOVERY_RANGE", None)
    env.pop("ROS_STATIC_PEERS", None)
    env.pop("ROS_LOCALHOST_ONLY", None)
    env.pop("FASTRTPS_DEFAULT_PROFILES_FILE", None)
    env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    return env


@contextlib.contextmanager
def safe_dds(domain_id: int | None = None) -> Iterator[dict[str, str]]:
    """Set the safe DDS variables in this process (before ``rclpy.init``) and restore them after."""
    env = safe_dds_env(domain_id)
    keys = (
        "ROS_DOMAIN_ID",
        "FASTDDS_BUILTIN_TRANSPORTS",
        "ROS_AUTOMATIC_DISCOVERY_RANGE",
        "ROS_STATIC_PEERS",
        "ROS_LOCALHOST_ONLY",
        "FASTRTPS_DEFAULT_PROFILES_FILE",
        "FASTDDS_DEFAULT_PROFILES_FILE",
        "RMW_IMPLEMENTATION",
    )
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        if k in env:
            os.environ[k] = env[k]
        else:
            os.environ.pop(k, None)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shm_snapshot() -> set[str]:
    """Names of the Fast DDS shared-memory files (segments and semaphores) that exist now."""
    try:
        return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(SHM_PREFIXES)}
    except OSError:
        return set()


def _mapped_shm_files(skip_pid: int | None = None) -> set[str]:
    """Names of /dev/shm files some live process other than ``skip_pid`` has mapped or open (not ours to delete)."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(skip_pid):
            continue
        with contextlib.suppress(OSError):
            for line in (proc / "maps").read_text().splitlines():
                idx = line.find("/dev/shm/")
                if idx >= 0:
                    used.add(Path(line[idx:].split(" (deleted)")[0]).name)
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("/dev/shm/"):
                        used.add(Path(target).name)
    return used


def leftover_shm(before: set[str], skip_pid: int | None = None) -> list[str]:
    """Fast DDS files created since ``before`` that no live process (but ``skip_pid``) uses: what we left behind."""
    new = shm_snapshot() - before
    if not new:
        return []
    return sorted(new - _mapped_shm_files(skip_pid))


def clean_shm(before: set[str], skip_pid: int | None = None) -> list[str]:
    """Delete the Fast DDS files created since ``before`` that no live process uses; returns their names.

    ``skip_pid``: a process whose own use does not count. A process that ran ROS clients in-process passes its
    own pid as it finishes: Fast DDS keeps its files mapped until the process exits and does not remove them.
    """
    removed = []
    for name in leftover_shm(before, skip_pid):
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / name).unlink()
            removed.append(name)
    return removed


def start_process(
    cmd: Sequence[str], env: Mapping[str, str], log_path: Path | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so we can stop it and its children), output to ``log_path``."""
    out = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115 - closed by the child
    try:
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        if log_path is not None:
            out.close()
    log.debug("started pid %d: %s", proc.pid, " ".join(cmd))
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """Stop a process we started and its group: SIGINT, then SIGTERM, then SIGKILL; returns its exit code.

    On return no process of the group runs any more (a warning is logged if one outlives SIGKILL by 5 s).
    """
    if proc.poll() is None:
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop on %s", proc.pid, sig.name)
    # children left in the group after the leader exited (multiprocessing's resource tracker, an engine child):
    # SIGKILL is delivered asynchronously, so wait until the group is really gone before saying it stopped
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if not wait_until(lambda: not group_alive(proc.pid), 5.0):
        log.warning("processes of group %d still run 5 s after SIGKILL", proc.pid)
    return proc.returncode


def group_alive(pid: int) -> bool:
    """Whether any process of the group led by ``pid`` still runs (zombies excepted)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            state, pgrp = fields[0], int(fields[2])
            if pgrp == pid and state != "Z":
                return True
    return False


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
