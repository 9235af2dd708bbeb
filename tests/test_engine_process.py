"""The engine in its own process (``engine.process.ProcessEngine``) behaves as the engine in the caller's process:
same answers from the same pixels, streaming, cancel, the same error types, and it survives its child dying."""

from __future__ import annotations

import glob
import os
import signal
import tempfile
import threading

import numpy as np
import pytest
from fake_engines import ScriptedEngine
from ros_helpers import wait_for

from surgery_r1_ros.engine.api import Cancelled, EngineError, InputError
from surgery_r1_ros.engine.process import ProcessEngine

SCRIPTED = "fake_engines:ScriptedEngine"


@pytest.fixture(scope="module")
def remote():
    os.environ["FAKE_ENGINE_TOKEN_S"] = "0.02"  # the child is spawned with this environment
    try:
        engine = ProcessEngine(None, SCRIPTED, "cpu")
    finally:
        del os.environ["FAKE_ENGINE_TOKEN_S"]
    yield engine
    engine.close()


def frame(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_same_answer_from_the_same_pixels(remote):
    local = ScriptedEngine()
    for stamp, image in enumerate([frame(1, 400, 600), frame(1)[:, ::-1, ::-1], frame(9, 28, 4096)]):  # strided too
        got = remote.ask("Where is suction?", image=image, stamp=stamp, reasoning=True)
        want = local.ask("Where is suction?", image=image, stamp=stamp, reasoning=True)
        assert (got.answer, got.box, got.reasoning) == (want.answer, want.box, want.reasoning)
    assert remote.backend_name == SCRIPTED and remote.device == "cpu"
    assert remote.encode(frame(2), stamp=("left", 3)) == ("left", 3)


def test_a_frame_already_sent_under_its_stamp_is_not_copied_again(remote):
    """The node asks about frames it encoded ahead: the pixels cross once, the question names them by stamp."""
    first, second = frame(11), frame(12)

    def mean_rgb(answer) -> str:  # the scripted engine reasons with the mean colour of the pixels it was given
        return answer.reasoning.split("mean RGB ")[1]

    remote.encode(first, stamp=("once", 1))
    same_stamp = remote.ask("Where?", image=second, stamp=("once", 1), reasoning=True)
    assert mean_rgb(same_stamp) == mean_rgb(ScriptedEngine().ask("Where?", image=first, reasoning=True))
    for stamp in (("once", 2), None):  # a new stamp, or none, sends the pixels
        answer = remote.ask("Where?", image=second, stamp=stamp, reasoning=True)
        assert mean_rgb(answer) == mean_rgb(ScriptedEngine().ask("Where?", image=second, reasoning=True))
    resized = frame(13, 48, 64)  # same stamp, other shape: not the frame the buffer holds
    answer = remote.ask("Where?", image=resized, stamp=("once", 2), reasoning=True)
    assert "size 64x48" in answer.reasoning


def test_streams_every_token_then_cancels_on_request(remote):
    seen = []
    answer = remote.ask("Where?", image=frame(3), stamp=1, reasoning=True, on_token=seen.append)
    assert [p.new_tokens for p in seen] == list(range(1, len(answer.reasoning.split(" ")) + 1))
    assert seen[-1].reasoning == answer.reasoning

    seen.clear()
    with pytest.raises(Cancelled) as stopped:
        remote.ask("Where?", image=frame(3), stamp=2, reasoning=True, on_token=seen.append,
                   cancelled=lambda: len(seen) >= 3)  # fmt: skip
    assert 3 <= stopped.value.progress.new_tokens <= 4  # the child stops at its next decode step
    assert remote.ask("Where?", image=frame(3), stamp=3).answer == "left-top"  # the pipe is in step


def test_errors_come_back_as_their_types(remote):
    with pytest.raises(InputError, match="no image"):
        remote.ask("Where?")
    with pytest.raises(InputError, match="grayscale"):
        remote.ask("Where?", image=np.zeros((64, 64), np.uint8))
    with pytest.raises(EngineError, match="RuntimeError: injected fault"):
        remote.ask("Please explode", image=frame(4))

    def broken_callback(_progress):
        raise ValueError("the caller's callback failed")

    with pytest.raises(ValueError, match="callback failed"):
        remote.ask("Where?", image=frame(4), reasoning=True, on_token=broken_callback)
    assert remote.ask("Where?", image=frame(4), stamp=9).answer == "left-top"


def test_a_child_dead_while_idle_is_started_again(remote):
    before = remote.pid
    os.kill(before, signal.SIGKILL)
    assert wait_for(lambda: remote.pid is None, 10)  # reaped (a zombie whose threads still exit is not yet)
    assert remote.ask("Where?", image=frame(5)).answer == "left-top"
    assert remote.pid not in (None, before)


def test_a_child_dying_mid_call_fails_that_call_only(monkeypatch):
    monkeypatch.setenv("FAKE_ENGINE_DELAY_S", "6")  # each ask sleeps 3 s in the first child ...
    engine = ProcessEngine(None, SCRIPTED, "cpu")
    monkeypatch.delenv("FAKE_ENGINE_DELAY_S")  # ... and the default 0.02 s in the one started again
    try:
        first = engine.pid
        threading.Timer(0.5, os.kill, (first, signal.SIGKILL)).start()
        with pytest.raises(EngineError, match=r"exited \(code -9\); the next request starts it again"):
            engine.ask("Where?", image=frame(6))
        assert engine.ask("Where?", image=frame(6)).answer == "left-top"
        assert engine.pid not in (None, first)
    finally:
        engine.close()


def test_start_failure_and_close():
    with pytest.raises(EngineError, match="RuntimeError: this engine cannot start"):
        ProcessEngine(None, "fake_engines:BrokenEngine", "cpu")
    engine = ProcessEngine(None, SCRIPTED, "cpu")
    pid = engine.pid
    assert not glob.glob(f"{tempfile.gettempdir()}/surgery_r1_frames_*") + glob.glob("/dev/shm/surgery_r1_frames_*")
    engine.close()
    engine.close()
    assert engine.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
