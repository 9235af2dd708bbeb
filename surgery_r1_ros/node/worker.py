"""The inference worker: one thread owns the engine; a bounded queue of questions; frames encoded ahead.

The ROS executor never runs the model. A service or action callback validates the request, picks its frame
and ``submit``s a Job; the worker answers jobs in arrival order and, while idle, encodes the newest frame so
a question about it pays only for the question (when the encoder keeps up with the camera: one slower than
the frame interval would only delay questions behind frames nobody asked about). The engine alone knows
which frames it holds: the worker only remembers the newest stamp it handed over, and always passes the
image with a question (an engine that still holds the stamp does not encode it again). A job may stream
(``on_token``) and be cancelled (``cancelled``): a cancelled job ends with ``error_kind`` "canceled" and
the ``progress`` made. ``Job.finish`` calls the job's ``on_done`` from the worker thread. ROS-free.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from surgery_r1_ros.engine.api import (
    CancelCheck,
    Cancelled,
    EngineProtocol,
    GroundedAnswer,
    InputError,
    Progress,
    TokenCallback,
)
from surgery_r1_ros.node.buffer import Frame

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One question about one frame, and what became of it."""

    question: str
    reasoning: bool
    frame: Frame
    received: float  # time.perf_counter() when the request arrived
    on_done: Callable[[Job], None] | None = None
    on_token: TokenCallback | None = None  # streaming (the action's feedback)
    cancelled: CancelCheck | None = None  # true once the requester wants the job stopped
    answer: GroundedAnswer | None = None  # the engine's reply
    progress: Progress | None = None  # what was generated before a cancel
    error: str = ""
    error_kind: str = ""  # counter key: "engine", "engine_input", "canceled", "shutdown"
    started: float = 0.0
    inference_ms: float = 0.0
    frame_age_ms: float = 0.0  # age of the frame when the request arrived
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self) -> None:
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


class QueueFull(RuntimeError):
    pass


class InferenceWorker:
    """Runs ``engine.ask`` for queued jobs on one thread; at most ``max_queue`` jobs waiting or running."""

    def __init__(
        self,
        engine: EngineProtocol,
        max_queue: int,
        *,
        encode_ahead: bool = True,
        newest_frame: Callable[[], Frame | None] = lambda: None,
        frame_interval_s: Callable[[], float | None] = lambda: None,
        max_new_tokens: int | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.engine = engine
        self.max_queue = max_queue
        self.can_encode = encode_ahead
        self._newest_frame = newest_frame
        self._frame_interval_s = frame_interval_s
        self.max_new_tokens = max_new_tokens
        self.encode_ms: float | None = None  # last measured encode time
        self.encoded_ahead = 0
        self._handed_over = 0  # seq of the newest frame the engine has been given (encode or ask)
        self._jobs: deque[Job] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="surgery_r1-inference", daemon=True)

    # -- control ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse waiting jobs, let a running one finish (up to ``timeout``), end the thread."""
        with self._cond:
            self._stopping = True
            dropped = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in dropped:
            job.error, job.error_kind = "the node is shutting down or cleaning up", "shutdown"
            job.finish()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def full(self) -> bool:
        """Whether a job submitted now would be refused."""
        with self._cond:
            return self._stopping or len(self._jobs) + self._running >= self.max_queue

    @property
    def depth(self) -> int:
        """Jobs waiting or running."""
        with self._cond:
            return len(self._jobs) + self._running

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when ``max_queue`` jobs are already waiting or running."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the node is shutting down")
            if len(self._jobs) + self._running >= self.max_queue:
                raise QueueFull(
                    f"busy: {self.max_queue} questions are already waiting or being answered (max_queue); retry shortly"
                )
            self._jobs.append(job)
            self._cond.notify()

    def frame_arrived(self) -> None:
        """Wake the worker to consider encoding the new frame (cheap; called from the intake callback)."""
        if self.can_encode:
            with self._cond:
                self._cond.notify()

    # -- the thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._jobs and self._frame_to_encode() is None:
                    self._cond.wait(0.5)
                if self._stopping:
                    return
                job = self._jobs.popleft() if self._jobs else None
                if job is not None:
                    self._running += 1
            if job is not None:
                try:
                    self._answer(job)
                finally:
                    with self._cond:
                        self._running -= 1
                job.finish()
            else:
                frame = self._frame_to_encode()
                if frame is not None:
                    self._encode(frame)

    def _frame_to_encode(self) -> Frame | None:
        if not self.can_encode:
            return None
        frame = self._newest_frame()
        if frame is None or frame.seq <= self._handed_over:
            return None
        interval = self._frame_interval_s()
        if self.encode_ms is not None and interval is not None and self.encode_ms / 1000.0 > interval:
            return None  # the encoder cannot keep up with the camera: encode on demand instead
        return frame

    def _encode(self, frame: Frame) -> None:
        self._handed_over = frame.seq
        start = time.perf_counter()
        try:
            self.engine.encode(frame.rgb(), frame.seq)
        except Exception as err:  # a frame the engine refuses is answered (and reported) on request
            log.debug("encode ahead of frame %d failed: %s", frame.seq, err)
            return
        self.encoded_ahead += 1
        self.encode_ms = (time.perf_counter() - start) * 1000.0

    def _answer(self, job: Job) -> None:
        job.started = time.perf_counter()
        if job.cancelled is not None and job.cancelled():
            job.error, job.error_kind = "canceled before it started", "canceled"
            job.progress = Progress("", 0)
            return
        frame = job.frame
        self._handed_over = max(self._handed_over, frame.seq)
        try:
            job.answer = self.engine.ask(
                job.question,
                image=frame.rgb(),
                stamp=frame.seq,
                reasoning=job.reasoning,
                max_new_tokens=self.max_new_tokens,
                on_token=job.on_token,
                cancelled=job.cancelled,
            )
            if job.answer.encode_ms > 0:
                self.encode_ms = job.answer.encode_ms
        except Cancelled as stop:
            job.progress = stop.progress
            job.error, job.error_kind = str(stop), "canceled"
        except InputError as err:
            job.error, job.error_kind = f"the engine refused the input: {err}", "engine_input"
        except Exception as err:
            job.error, job.error_kind = f"engine failure: {type(err).__name__}: {err}", "engine"
            log.error("engine failure on %r:\n%s", job.question, traceback.format_exc())
        finally:
            job.inference_ms = (time.perf_counter() - job.started) * 1000.0
