"""An engine in its own process, so the ROS node's camera intake and the model never share one Python GIL.

Measured on the 2-core CPU with 1280x1024 rgb8 frames arriving at 30 Hz: ``engine.ask`` p50 87.9 ms with the
subscription in the same process, 78.4 ms with it in another process (``benchmarks/bench_node.py`` has the
node-level numbers). The model's runtimes release the GIL, but every return to Python between kernels then
waits for the executor thread, which holds the GIL while rclpy converts each 4 MB message. A lower
``sys.setswitchinterval`` made it worse (92.5 ms).

``ProcessEngine`` implements ``EngineProtocol`` by running ``open_engine(model, backend, device, **options)``
in a spawned child and forwarding ``encode`` / ``ask`` / ``close`` over a pipe. Frames travel through a
shared frame buffer (one copy in, a read-only view in the child, valid for that call; through the pipe a
4 MB frame cost the receiver ~6 ms of CPU). A frame already in that buffer under the same stamp and shape is
not copied again: the node's question about a frame encoded ahead sends only its stamp and shape (a stamp
names one frame: the engine contract; ``None`` always copies). The buffer is a file in /dev/shm whose name is
removed as soon as both processes have mapped it, so nothing is left behind however either process ends.
Answers, progress and errors cross the pipe as small pickled values of this package's own types.
Streaming and cancel work as in-process: the child sends every token's ``Progress``; the caller's
``cancelled()`` is checked on every token and while waiting, and sets an event the child's decode loop
checks before its next step. Errors come back as the same types (``InputError``, ``Cancelled``); anything
else raises ``EngineError`` naming the child's exception. A child that dies (a crash, an out-of-memory kill)
fails the call in progress with ``EngineError`` and is started again on the next call.

The standard library has no RPC for this (``multiprocessing.managers`` proxies cannot stream callbacks or
cancel a call in flight), hence the small hand-written protocol.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing
import os
import signal
import tempfile
import threading
import traceback
from collections.abc import Hashable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from surgery_r1_ros.engine.api import (
    MAX_SIDE,
    CancelCheck,
    Cancelled,
    EngineError,
    GroundedAnswer,
    InputError,
    TokenCallback,
    check_rgb,
    describe_engine,
    open_engine,
)

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading and, the first time, exporting a model
FRAME_BYTES = MAX_SIDE * MAX_SIDE * 3  # the largest frame an engine takes; pages are used only when touched
POLL_S = 0.02  # how often a waiting call checks its cancel flag and that the child is alive


class ProcessEngine:
    """``open_engine(model, backend, device, **options)`` in a child process; ``model``: a folder or None."""

    def __init__(self, model: str | None = None, backend: str = "auto", device: str | None = None,
                 **options: Any) -> None:  # fmt: skip
        if model is not None and not isinstance(model, str):
            raise EngineError("ProcessEngine takes a model folder path or None (the built-in model)")
        self._spec = (model, backend, device, options)
        self._lock = threading.Lock()
        self._context = multiprocessing.get_context("spawn")  # fork would copy the node's DDS threads' state
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._frames: mmap.mmap | None = None
        self._in_frames: tuple | None = None  # (stamp, shape) of the frame the shared buffer holds
        self._cancel = self._context.Event()
        self.backend_name: str  # both as the child resolved them ("auto" made concrete), set by _start
        self.device: str
        with self._lock:
            self._start()

    # -- EngineProtocol -------------------------------------------------------------------------------------
    def encode(self, image: np.ndarray, stamp: Hashable | None = None) -> Hashable:
        return self._call(("encode", stamp), image, stamp=stamp)

    def ask(
        self,
        question: str,
        image: np.ndarray | None = None,
        stamp: Hashable | None = None,
        reasoning: bool = False,
        max_new_tokens: int | None = None,
        *,
        on_token: TokenCallback | None = None,
        cancelled: CancelCheck | None = None,
    ) -> GroundedAnswer:
        request = ("ask", question, stamp, reasoning, max_new_tokens, on_token is not None)
        return self._call(request, image, on_token, cancelled, stamp)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to close its engine and exit; terminate it if it does not within ``timeout``."""
        self._cancel.set()  # a call in flight stops at its next decode step
        locked = self._lock.acquire(timeout=timeout)
        try:
            if self._conn is not None and self._alive():
                with contextlib.suppress(OSError):
                    self._conn.send(("close",))
            self._stop(timeout)
        finally:
            if locked:
                self._lock.release()

    @property
    def pid(self) -> int | None:
        """The child's process id (None when it is not running); safe to read from any thread."""
        process = self._process  # the worker thread may drop it meanwhile
        return process.pid if process is not None and process.is_alive() else None

    # -- the parent's side --------------------------------------------------------------------------------
    def _start(self) -> None:
        fd, path = tempfile.mkstemp(prefix="surgery_r1_frames_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            try:
                os.ftruncate(fd, FRAME_BYTES)
                self._frames = mmap.mmap(fd, FRAME_BYTES)
                self._in_frames = None
            finally:
                os.close(fd)  # the mapping keeps the file open
            parent, child = self._context.Pipe()
            self._process = self._context.Process(
                target=_serve, args=(child, self._cancel, path, *self._spec), name="surgery_r1-engine", daemon=True
            )
            self._process.start()
            child.close()
            self._conn = parent
            kind, payload = self._receive(START_TIMEOUT_S)
        finally:
            os.unlink(path)  # mapped by both (or the child failed): the name is not needed any more
        if kind != "ready":
            self._stop(5.0)
            raise EngineError(f"the engine process did not start: {payload}")
        self.backend_name, self.device = payload
        log.info("engine process %d ready (%s on %s)", self._process.pid, self.backend_name, self.device)

    def _call(self, request: tuple, image: np.ndarray | None, on_token: TokenCallback | None = None,
              cancelled: CancelCheck | None = None, stamp: Hashable | None = None) -> Any:  # fmt: skip
        if image is not None:
            image = check_rgb(image)  # the shape travels beside the bytes: it must be a valid frame
        with self._lock:
            if not self._alive():
                log.warning("engine process is not running: starting it again")
                self._start()
            self._cancel.clear()
            try:
                if image is not None and (stamp is None or (stamp, image.shape) != self._in_frames):
                    self._in_frames = None  # until the copy is complete
                    np.frombuffer(self._frames, np.uint8, image.size).reshape(image.shape)[...] = image
                    self._in_frames = None if stamp is None else (stamp, image.shape)
                self._conn.send((*request, None if image is None else image.shape))
            except OSError:  # it died after the check above
                raise EngineError(f"{self._died()[1]}; the next request starts it again") from None
            failure: BaseException | None = None
            while True:  # read to the call's last message even after a callback failed: the pipe stays in step
                kind, payload = self._receive(None, cancelled)
                if kind != "token":
                    break
                if failure is None and on_token is not None:
                    try:
                        on_token(payload)
                    except BaseException as err:  # re-raised once the child has stopped
                        failure = err
                        self._cancel.set()
                if cancelled is not None and cancelled():
                    self._cancel.set()
        if failure is not None:
            raise failure
        if kind == "done":
            return payload
        if kind == "cancelled":
            raise Cancelled(payload)
        if kind == "input_error":
            raise InputError(payload)
        raise EngineError(payload if self._alive() else f"{payload}; the next request starts it again")

    def _receive(self, timeout: float | None, cancelled: CancelCheck | None = None) -> tuple[str, Any]:
        """The child's next message; ("error", why) when it died or did not answer within ``timeout``."""
        waited = 0.0
        while not self._conn.poll(POLL_S):
            if not self._alive():
                return self._died()
            if cancelled is not None and cancelled():
                self._cancel.set()
            waited += POLL_S
            if timeout is not None and waited > timeout:
                self._stop(5.0)
                return "error", f"the engine process did not start within {timeout:.0f} s"
        try:
            return self._conn.recv()
        except (EOFError, OSError):  # its end of the pipe closed: it is exiting
            return self._died()

    def _died(self) -> tuple[str, str]:
        self._process.join(1.0)
        code = self._process.exitcode
        self._stop(1.0)
        return "error", f"the engine process exited (code {code})"

    def _alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def _stop(self, timeout: float) -> None:
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout)
            self._process = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._frames is not None:
            self._frames.close()
            self._frames = None


# -- the child's side --------------------------------------------------------------------------------------
def _serve(conn: Connection, cancel: Any, frames_path: str, model: str | None, backend: str, device: str | None,
           options: dict) -> None:  # fmt: skip
    """The child: open the engine, then answer requests until "close" or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    with open(frames_path, "rb") as file:
        frames = mmap.mmap(file.fileno(), FRAME_BYTES, access=mmap.ACCESS_READ)
    logging.basicConfig(level=logging.INFO, format="[engine process] %(levelname)s %(name)s: %(message)s")
    try:
        engine = open_engine(model, backend, device, **options)
    except Exception as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", describe_engine(engine, backend, device)))
    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return  # the parent has gone
            if request[0] == "close":
                return
            shape = request[-1]
            image = None if shape is None else np.frombuffer(frames, np.uint8, int(np.prod(shape))).reshape(shape)
            conn.send(_handle(engine, request, image, conn, cancel))
    finally:
        engine.close()


def _handle(engine: Any, request: tuple, image: np.ndarray | None, conn: Connection, cancel: Any) -> tuple:
    try:
        if request[0] == "encode":
            return "done", engine.encode(image, request[1])
        _, question, stamp, reasoning, max_new_tokens, stream, _ = request
        on_token = (lambda progress: conn.send(("token", progress))) if stream else None
        answer = engine.ask(question, image=image, stamp=stamp, reasoning=reasoning, max_new_tokens=max_new_tokens,
                            on_token=on_token, cancelled=cancel.is_set)  # fmt: skip
        return "done", answer
    except Cancelled as stop:
        return "cancelled", stop.progress
    except InputError as err:
        return "input_error", str(err)
    except Exception as err:
        log.error("%s", traceback.format_exc())
        return "error", f"{type(err).__name__}: {err}"
