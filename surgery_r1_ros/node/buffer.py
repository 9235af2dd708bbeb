"""A small stamped buffer of the newest camera frames, and the rule that picks the frame a question is about.

Intake only stores a frame (a view of the message's bytes and a function that converts it); the RGB array
is made on first use and cached, so a 30 Hz stream never waits for colour conversion or JPEG decoding.
ROS-free: stamps are integer nanoseconds, arrival times come from ``time.monotonic``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NS = 1_000_000_000


def stamp_to_ns(sec: int, nanosec: int) -> int:
    return int(sec) * NS + int(nanosec)


def ns_to_stamp(ns: int) -> tuple[int, int]:
    return ns // NS, ns % NS


@dataclass(eq=False)
class Frame:
    """One received frame. ``rgb()`` converts on first call (thread-safe) and caches the array."""

    stamp_ns: int  # the camera's header stamp
    frame_id: str  # without a leading '/'
    received: float  # time.monotonic() at arrival
    width: int
    height: int
    convert: Callable[[], np.ndarray]
    seq: int = 0  # arrival number, set by the buffer
    encoded: Any = None  # the engine's encoding of this frame, when it was encoded ahead
    _rgb: np.ndarray | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rgb(self) -> np.ndarray:
        if self._rgb is None:
            with self._lock:
                if self._rgb is None:
                    self._rgb = self.convert()
        return self._rgb

    def age(self, now: float | None = None) -> float:
        """Seconds since the frame arrived."""
        return (time.monotonic() if now is None else now) - self.received


class FrameSelectionError(LookupError):
    """No usable frame for a request; ``reason`` is a short counter key, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FrameBuffer:
    """The newest ``capacity`` frames, oldest first. All methods are thread-safe and O(capacity)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the frame buffer needs room for at least one frame")
        self._frames: deque[Frame] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._count = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    @property
    def received(self) -> int:
        """Frames pushed since creation."""
        return self._count

    def push(self, frame: Frame) -> None:
        with self._lock:
            self._count += 1
            frame.seq = self._count
            self._frames.append(frame)

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()

    def newest(self) -> Frame | None:
        with self._lock:
            return self._frames[-1] if self._frames else None

    def frames(self) -> list[Frame]:
        with self._lock:
            return list(self._frames)

    def select(self, stamp_ns: int, tolerance_s: float, max_age_s: float, now: float | None = None) -> Frame:
        """The frame a request is about: the newest for stamp 0, else the nearest within ``tolerance_s``.

        Raises FrameSelectionError when there is no frame yet, when no buffered frame is within the
        tolerance of the stamp, or when the chosen frame arrived more than ``max_age_s`` ago.
        """
        now = time.monotonic() if now is None else now
        frames = self.frames()
        if not frames:
            raise FrameSelectionError("no_frame", "no camera frame received yet: is the image topic publishing?")
        if stamp_ns == 0:
            frame = frames[-1]
        else:
            frame = min(frames, key=lambda f: abs(f.stamp_ns - stamp_ns))
            offset = abs(frame.stamp_ns - stamp_ns) / NS
            if offset > tolerance_s:
                oldest, newest = frames[0].stamp_ns, frames[-1].stamp_ns
                raise FrameSelectionError(
                    "no_match",
                    f"no buffered frame within {tolerance_s:g} s of stamp {_fmt(stamp_ns)} "
                    f"(nearest is {offset:.3f} s away; buffer holds {_fmt(oldest)} .. {_fmt(newest)})",
                )
        age = frame.age(now)
        if age > max_age_s:
            raise FrameSelectionError(
                "stale",
                f"the {'newest' if stamp_ns == 0 else 'matching'} frame arrived {age:.2f} s ago, more than "
                f"max_frame_age_s={max_age_s:g}: the camera stream has stopped or stalled",
            )
        return frame


def _fmt(stamp_ns: int) -> str:
    sec, nsec = ns_to_stamp(stamp_ns)
    return f"{sec}.{nsec:09d}"
