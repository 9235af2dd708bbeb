"""Counters and rates behind the node's /diagnostics status, ROS-free so they are unit-tested directly."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
MAX_ERROR_CHARS = 300  # last_*_error values are cut to this: a message may quote what a client sent


@dataclass(frozen=True)
class Status:
    level: int
    message: str
    values: dict[str, str]


class NodeStats:
    """Input frame rate, frame age, request latency and error counts. Thread-safe."""

    def __init__(self, rate_window_s: float = 5.0, latency_window: int = 200) -> None:
        self._lock = threading.Lock()
        self._rate_window_s = rate_window_s
        self._arrivals: deque[float] = deque()
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._inference: deque[float] = deque(maxlen=latency_window)
        self.errors: Counter[str] = Counter()
        self.frames_received = 0
        self.answered = 0
        self.refused = 0
        self.last_frame_arrival: float | None = None
        self.last_frame_error = ""
        self.last_request_error = ""

    def frame(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.frames_received += 1
            self.last_frame_arrival = now
            self._arrivals.append(now)
            self._trim(now)

    def bad_frame(self, reason: str, message: str) -> None:
        """A frame refused at intake (or dropped when it failed to decode), counted as frames_skipped_<reason>."""
        with self._lock:
            self.errors[f"frames_skipped_{reason}"] += 1
            self.last_frame_error = message[:MAX_ERROR_CHARS]

    def answer(self, latency_ms: float, inference_ms: float) -> None:
        with self._lock:
            self.answered += 1
            self._latencies.append(latency_ms)
            self._inference.append(inference_ms)

    def refusal(self, reason: str, message: str) -> None:
        with self._lock:
            self.refused += 1
            self.errors[f"requests_refused_{reason}"] += 1
            self.last_request_error = message[:MAX_ERROR_CHARS]

    def _trim(self, now: float) -> None:
        while self._arrivals and now - self._arrivals[0] > self._rate_window_s:
            self._arrivals.popleft()

    def frame_rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            if len(self._arrivals) < 2:
                return 0.0
            span = now - self._arrivals[0]
            return (len(self._arrivals) - 1) / span if span > 0 else 0.0

    def latency_percentiles(self) -> tuple[float, float, float]:
        """(p50, p95, last) request latency in ms; NaN before the first answer."""
        with self._lock:
            values = list(self._latencies)
        if not values:
            return float("nan"), float("nan"), float("nan")
        p50, p95 = np.percentile(values, [50, 95])
        return float(p50), float(p95), values[-1]

    def status(
        self,
        *,
        model: str,
        backend: str,
        device: str,
        state: str,
        max_frame_age_s: float,
        queue_depth: int,
        now: float | None = None,
    ) -> Status:
        now = time.monotonic() if now is None else now
        rate = self.frame_rate(now)
        p50, p95, last = self.latency_percentiles()
        with self._lock:
            age = None if self.last_frame_arrival is None else now - self.last_frame_arrival
            errors = dict(self.errors)
            values = {
                "state": state,
                "model": model,
                "backend": backend,
                "device": device,
                "input_frame_rate_hz": f"{rate:.1f}",
                "frame_age_s": "none" if age is None else f"{age:.3f}",
                "frames_received": str(self.frames_received),
                "latency_p50_ms": f"{p50:.1f}",
                "latency_p95_ms": f"{p95:.1f}",
                "latency_last_ms": f"{last:.1f}",
                "inference_p50_ms": f"{np.median(self._inference):.1f}" if self._inference else "nan",
                "answered": str(self.answered),
                "refused": str(self.refused),
                "queue_depth": str(queue_depth),
                "last_frame_error": self.last_frame_error,
                "last_request_error": self.last_request_error,
            }
        values.update({k: str(v) for k, v in sorted(errors.items())})
        skipped = sum(v for k, v in errors.items() if k.startswith("frames_skipped"))
        values["frames_skipped"] = str(skipped)
        if state != "active":
            return Status(WARN, f"{state}: not answering", values)
        if age is None:
            if skipped:
                return Status(ERROR, f"all {skipped} camera frames were skipped: see last_frame_error", values)
            return Status(WARN, "no camera frame received yet", values)
        if age > max_frame_age_s:
            return Status(WARN, f"camera stream stalled: newest frame is {age:.1f} s old", values)
        return Status(OK, f"answering ({skipped} bad frames skipped)" if skipped else "answering", values)
