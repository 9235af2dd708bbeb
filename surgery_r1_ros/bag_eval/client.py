"""``bag eval``'s side of the ROS graph: the ``~/ask`` client and a /diagnostics listener, spun by a thread.

``fill_answer`` copies an AskQuestion response into an ``AskedQuestion``; it only reads fields, so tests call
it with plain objects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from surgery_r1_ros.bag_eval.report import AskedQuestion
from surgery_r1_ros.ros_fields import msg_stamp_ns, ns_to_stamp, roi_to_box

log = logging.getLogger(__name__)


class AskClient:
    """An rclpy context of its own (domain ``domain_id``), a node with the ``~/ask`` client and a listener."""

    def __init__(self, node_name: str, domain_id: int | None) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile
        from rclpy.signals import SignalHandlerOptions

        from surgery_r1_interfaces.srv import AskQuestion

        self.AskQuestion = AskQuestion
        self.context = rclpy.Context()
        kwargs = {"domain_id": domain_id} if domain_id is not None else {}
        rclpy.init(context=self.context, signal_handler_options=SignalHandlerOptions.NO, **kwargs)
        self.node = rclpy.create_node(f"surgery_r1_bag_eval_{os.getpid()}", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.client = self.node.create_client(AskQuestion, f"{node_name}/ask")
        self.base = node_name.rsplit("/", 1)[-1]
        self.frames_received: int | None = None
        self.diagnostics_seen = threading.Event()
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, QoSProfile(depth=10))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="eval-executor", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set() and self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception as err:  # context shut down
                log.debug("eval executor stopped: %s", err)
                return

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if "frames_received" in values and (self.base in status.name or self.base in status.hardware_id):
                with contextlib.suppress(ValueError):
                    self.frames_received = int(values["frames_received"])
                    self.diagnostics_seen.set()

    def wait_for_service(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.client.wait_for_service(timeout_sec=0.2):
                return True
            if not alive():
                return False
        return False

    def ask(self, question: str, stamp_ns: int, reasoning: bool, timeout: float) -> tuple[Any, float]:
        """Call ~/ask; returns (the response, or None on timeout; round trip in ms)."""
        request = self.AskQuestion.Request(question=question, reasoning=reasoning)
        request.stamp.sec, request.stamp.nanosec = ns_to_stamp(stamp_ns)
        start = time.perf_counter()
        future = self.client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(timeout):
            with contextlib.suppress(Exception):
                self.client.remove_pending_request(future)
            return None, (time.perf_counter() - start) * 1e3
        return future.result(), (time.perf_counter() - start) * 1e3

    def close(self) -> None:
        import rclpy

        self._stop.set()
        self._thread.join(3.0)
        with contextlib.suppress(Exception):
            self.executor.shutdown(timeout_sec=1.0)
        with contextlib.suppress(Exception):
            self.node.destroy_node()
        with contextlib.suppress(Exception):
            rclpy.shutdown(context=self.context)


def fill_answer(q: AskedQuestion, response: Any, round_trip_ms: float, size: tuple[int, int]) -> None:
    """Record an AskQuestion response (None: timed out) for ``q``, asked about a frame of ``size``."""
    q.asked = True
    q.round_trip_ms = round_trip_ms
    q.answered_size = list(size)
    if response is None:
        q.success = False
        q.error = "timeout: no response within the per-question timeout"
        return
    q.success = bool(response.success)
    q.error = response.error
    q.answer = response.answer
    q.reasoning = response.reasoning
    box = roi_to_box(response.box)
    q.box = list(box) if box is not None else None
    q.coherent = bool(response.coherent)
    q.latency_ms = float(response.latency_ms)
    q.inference_ms = float(response.inference_ms)
    q.frame_age_ms = float(response.frame_age_ms)
    q.answered_stamp_ns = msg_stamp_ns(response.image_header.stamp)
