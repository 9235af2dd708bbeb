"""Engine classes for node tests, given to the node as ``backend:=fake_engines:ScriptedEngine``.

They implement ``EngineProtocol`` and answer instantly (plus ``FAKE_ENGINE_DELAY_S``, default 0.02 s, to
stand in for compute), so the node's own behaviour (queueing, frame choice, field mapping, fault
handling, streaming, cancel) is tested in seconds. A question containing "explode" raises inside ``ask``
(fault injection). With reasoning, the reasoning is "generated" one word per token, each taking
``FAKE_ENGINE_TOKEN_S`` (default 0), reported to ``on_token`` and preceded by the ``cancelled`` check.
"""

from __future__ import annotations

import os
import time

import numpy as np

from surgery_r1_ros.engine.api import Cancelled, GroundedAnswer, InputError, Progress


class ScriptedEngine:
    """Answers "left-top" with the image's top-left quarter as the box; the reasoning gives the image's size and
    mean R, G, B (so tests can check the node's colour conversion end to end)."""

    def __init__(self, model=None, device=None, **_options) -> None:
        self.delay = float(os.environ.get("FAKE_ENGINE_DELAY_S", "0.02"))
        self.token_s = float(os.environ.get("FAKE_ENGINE_TOKEN_S", "0"))
        self.encoded: dict = {}
        self.asked = 0

    def encode(self, image: np.ndarray, stamp=None):
        time.sleep(self.delay / 2)
        self.encoded[stamp] = image.shape
        while len(self.encoded) > 4:
            self.encoded.pop(next(iter(self.encoded)))
        return stamp

    def ask(self, question, image=None, stamp=None, reasoning=False, max_new_tokens=None, *, on_token=None,
            cancelled=None) -> GroundedAnswer:  # fmt: skip
        start = time.perf_counter()
        self.asked += 1
        if "explode" in question:
            raise RuntimeError("injected fault: the model blew up")
        if image is None:
            raise InputError("no image")
        if stamp not in self.encoded:
            self.encode(image, stamp)
        time.sleep(self.delay / 2)
        h, w = image.shape[:2]
        text = None
        if reasoning:
            mean = ",".join(f"{v:.1f}" for v in image.reshape(-1, 3).mean(axis=0))
            text = f"The instrument is in the left-top. size {w}x{h} mean RGB {mean}"
            self._stream(text, on_token, cancelled)
        return GroundedAnswer("left-top", text, (0, 0, w // 2, h // 2), True, (time.perf_counter() - start) * 1000)

    def _stream(self, reasoning: str, on_token, cancelled) -> None:
        """One word per token, as ``<think>`` text, with the cancel check before every step."""
        words = reasoning.split(" ")
        for n in range(1, len(words) + 1):
            progress = Progress("<think>" + " ".join(words[:n]), n)
            if on_token is not None:
                on_token(progress)
            if n == len(words):
                return
            if cancelled is not None and cancelled():
                raise Cancelled(progress)
            time.sleep(self.token_s)

    def close(self) -> None:
        self.encoded.clear()


class SilentEngine(ScriptedEngine):
    """A model whose output had no readable answer (what an untrained model gives)."""

    def ask(self, question, image=None, stamp=None, reasoning=False, max_new_tokens=None, **_stream) -> GroundedAnswer:
        return GroundedAnswer(None, None, None, False, 1.0, problems=("no <answer>...</answer>",))


class BrokenEngine(ScriptedEngine):
    """Fails to start: configure must fail cleanly."""

    def __init__(self, model=None, device=None, **_options) -> None:
        raise RuntimeError("this engine cannot start")


class AskOnly:
    """Not an engine: it cannot encode frames (open_engine must refuse it)."""

    def __init__(self, model=None, device=None, **_options) -> None:
        pass

    def ask(self, question, **_kw):
        return None

    def close(self) -> None:
        pass
