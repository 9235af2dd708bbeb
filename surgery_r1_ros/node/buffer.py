"""A small stamped buffer of the newest camera frames, and the rule that picks the frame a question is about.

Intake stores only frames the engine can use (``node.image`` checks them first) as a view of the message's
bytes and a function that converts it; the RGB array is made on first use and cached, so a 30 Hz stream never
waits for colour conversion or JPEG decoding. A compressed frame whose header looked right can still fail to
decode: ``select`` decodes a candidate before handing it out and drops it when that fails, so a broken frame
is never the answered frame (the next best one is). ROS-free: stamps are integer nanoseconds, arrival times
come from ``time.monotonic``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from surgery_r1_ros.ros_fields import NS_PER_S, ns_to_stamp


@dataclass(eq=False)
class Frame:
    """One received frame. ``rgb()`` converts on first call (thread-safe) and caches the array, or the error."""

    stamp_ns: int  # the camera's header stamp
    frame_id: str  # without a leading '/'
    received: float  # time.monotonic() at arrival
    width: int
    height: int
    convert: Callable[[], np.ndarray]
    seq: int = 0  # arrival number, set by the buffer; the stamp the engine knows this frame by
    checked: bool = True  # False: converting may still fail (a compressed frame not decoded yet)
    _rgb: np.ndarray | None = field(default=None, repr=False)
    _error: Exception | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rgb(self) -> np.ndarray:
        if self._rgb is None:
            with self._lock:
                if self._rgb is None and self._error is None:
                    try:
                        self._rgb = self.convert()
                    except Exception as err:  # kept: a broken frame is not decoded twice
                        self._error = err
                    self.checked = True
                if self._error is not None:
                    raise self._error
        return self._rgb

    def usable(self) -> Exception | None:
        """None when the frame converts to RGB, else the error (converting it now if it was not checked)."""
        if self.checked and self._error is None:
            return None
        try:
            self.rgb()
        except Exception as err:
            return err
        return None

    def age(self, now: float | None = None) -> float:
        """Seconds since the frame arrived."""
        return (time.monotonic() if now is None else now) - self.received


class FrameSelectionError(LookupError):
    """No usable frame for a request; ``reason`` is a short counter key, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FrameBuffer:
    """The newest ``capacity`` frames, oldest first. All methods are thread-safe and O(capacity).

    ``on_unusable(reason, message)`` hears of every frame ``select`` dropped because it did not convert.
    """

    def __init__(self, capacity: int, on_unusable: Callable[[str, str], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError("the frame buffer needs room for at least one frame")
        self._frames: deque[Frame] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._count = 0
        self._on_unusable = on_unusable

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

        Frames that fail to convert are dropped on the way (the next candidate is taken). Raises
        FrameSelectionError when there is no usable frame, when no buffered frame is within the tolerance of
        the stamp, or when the chosen frame arrived more than ``max_age_s`` ago.
        """
        now = time.monotonic() if now is None else now
        frames = self.frames()
        if stamp_ns == 0:
            candidates = frames[::-1]
        else:
            candidates = sorted(frames, key=lambda f: abs(f.stamp_ns - stamp_ns))
            candidates = [f for f in candidates if abs(f.stamp_ns - stamp_ns) <= tolerance_s * NS_PER_S]
        frame = next((f for f in candidates if self._usable(f)), None)
        if frame is None:
            frames = self.frames()
            if not frames:
                raise FrameSelectionError("no_frame", "no camera frame received yet: is the image topic publishing?")
            if stamp_ns == 0:
                raise FrameSelectionError("no_frame", "no buffered camera frame could be decoded")
            nearest = min(frames, key=lambda f: abs(f.stamp_ns - stamp_ns))
            offset = abs(nearest.stamp_ns - stamp_ns) / NS_PER_S
            raise FrameSelectionError(
                "no_match",
                f"no buffered frame within {tolerance_s:g} s of stamp {_fmt(stamp_ns)} "
                f"(nearest is {offset:.3f} s away; buffer holds {_fmt(frames[0].stamp_ns)} .. "
                f"{_fmt(frames[-1].stamp_ns)})",
            )
        age = frame.age(now)
        if age > max_age_s:
            raise FrameSelectionError(
                "stale",
                f"the {'newest' if stamp_ns == 0 else 'matching'} frame arrived {age:.2f} s ago, more than "
                f"max_frame_age_s={max_age_s:g}: the camera stream has stopped or stalled",
            )
        return frame

    def _usable(self, frame: Frame) -> bool:
        error = frame.usable()
        if error is None:
            return True
        with self._lock:
            if frame not in self._frames:
                return False  # another request dropped it already
            self._frames.remove(frame)
        if self._on_unusable is not None:
            self._on_unusable(getattr(error, "reason", "decode"), str(error))
        return False


def _fmt(stamp_ns: int) -> str:
    sec, nsec = ns_to_stamp(stamp_ns)
    return f"{sec}.{nsec:09d}"
