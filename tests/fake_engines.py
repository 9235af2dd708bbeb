"""Engine classes for node tests, given to the node as ``backend:=fake_engines:ScriptedEngine``.

They have the Engine's interface and answer instantly (plus ``FAKE_ENGINE_DELAY_S``, default 0.02 s, to
stand in for compute), so the node's own behaviour (queueing, frame choice, field mapping, fault
handling) is tested in seconds. A question containing "explode" raises inside ``ask`` (fault injection).
"""

from __future__ import annotations

import os
import time

import numpy as np

from surgery_r1_ros.engine.engine import GroundedAnswer


class ScriptedEngine:
    """Answers "left-top" with the image's top-left quarter as the box; the reasoning gives the image's size and
    mean R, G, B (so tests can check the node's colour conversion end to end)."""

    def __init__(self, model=None, device=None, **_options) -> None:
        self.delay = float(os.environ.get("FAKE_ENGINE_DELAY_S", "0.02"))
        self.encoded: dict = {}
        self.asked = 0

    def encode(self, image: np.ndarray, stamp=None):
        time.sleep(self.delay / 2)
        self.encoded[stamp] = image.shape
        while len(self.encoded) > 4:
            self.encoded.pop(next(iter(self.encoded)))
        return stamp

    def ask(self, question, image=None, stamp=None, reasoning=False, max_new_tokens=None) -> GroundedAnswer:
        start = time.perf_counter()
        self.asked += 1
        if "explode" in question:
            raise RuntimeError("injected fault: the model blew up")
        if image is None:
            raise ValueError("no image")
        if stamp not in self.encoded:
            self.encode(image, stamp)
        time.sleep(self.delay / 2)
        h, w = image.shape[:2]
        text = None
        if reasoning:
            mean = ",".join(f"{v:.1f}" for v in image.reshape(-1, 3).mean(axis=0))
            text = f"The instrument is in the left-top. size {w}x{h} mean RGB {mean}"
        return GroundedAnswer("left-top", text, (0, 0, w // 2, h // 2), True, (time.perf_counter() - start) * 1000)

    def close(self) -> None:
        self.encoded.clear()


class SilentEngine(ScriptedEngine):
    """A model whose output had no readable answer (what an untrained model gives)."""

    def ask(self, question, image=None, stamp=None, reasoning=False, max_new_tokens=None) -> GroundedAnswer:
        return GroundedAnswer(None, None, None, False, 1.0, problems=("no <answer>...</answer>",))


class BrokenEngine:
    """Fails to start: configure must fail cleanly."""

    def __init__(self, model=None, device=None, **_options) -> None:
        raise RuntimeError("this engine cannot start")
