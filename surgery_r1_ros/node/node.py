"""The Surgery-R1 lifecycle node: camera frames in, grounded answers out.

- configure: load the engine (model_path, backend, device); a bad model or backend fails the transition
  with one clear log line. Creates ~/ask (AskQuestion service), ~/ask_action (AskQuestion action: the
  reasoning streamed as feedback, cancellable), ~/answers (GroundedAnswer), ~/annotated_image.
- activate: subscribe the camera (image_topic, raw or compressed, QoS image_qos) into a small stamped
  buffer; answer questions.
- /diagnostics: model, backend, engine process id, input frame rate, frame age, latency p50/p95/last, error
  counts.

Threading (measured in benchmarks/bench_node.py): by default one thread spins the executor (image intake,
service requests, goals, timers) and never runs the model; an inference worker thread owns the engine and
a bounded queue of questions, shared by the service and the action. Their callbacks are coroutines that
wait for their job without blocking the executor, so frames keep flowing while a question is answered.
The model itself runs in its own process (``engine_process``, default true; ``engine.process``), so the
intake's work on every message never holds up the model's Python between its kernels (the GIL); if that
process dies, the question in flight fails and the next one starts it again.
``executor:=multi`` runs the same node under a MultiThreadedExecutor for comparison.

Goals: a goal is rejected (reason in the log and the diagnostics counters) when the node is not active or
the queue is full; otherwise it is answered like a service request, with feedback (reasoning so far,
tokens) after every generated token. A cancel stops the generation before its next decode step and ends the
goal as canceled, with the reasoning generated so far in the result. A client that disappears mid-goal
changes nothing: the answer is computed, published on ~/answers and dropped after rclpy's result timeout.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from functools import partial
from typing import Any

import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import (
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
    qos_profile_services_default,
    qos_profile_system_default,
)
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from surgery_r1_interfaces.action import AskQuestion as AskAction
from surgery_r1_interfaces.msg import GroundedAnswer
from surgery_r1_interfaces.srv import AskQuestion
from surgery_r1_ros.engine.api import InputError, Progress, check_question
from surgery_r1_ros.engine.process import ProcessEngine
from surgery_r1_ros.node.annotate import draw_answer
from surgery_r1_ros.node.buffer import Frame, FrameBuffer, FrameSelectionError
from surgery_r1_ros.node.diagnostics import NodeStats
from surgery_r1_ros.node.engine_loader import EngineLoadError, LoadedEngine, load_engine
from surgery_r1_ros.node.image import (
    ImageError,
    check_compressed,
    check_image,
    clean_frame_id,
    compressed_to_rgb,
    image_to_rgb,
    rgb_to_image_fields,
)
from surgery_r1_ros.node.params import EXECUTOR_CHOICES, NODE_NAME, PARAMETERS, QOS_CHOICES
from surgery_r1_ros.node.worker import InferenceWorker, Job, QueueFull
from surgery_r1_ros.ros_fields import box_to_roi, msg_stamp_ns, ns_to_stamp

WARMUP_QUESTION = "What organ is being operated?"
Reply = AskQuestion.Response | AskAction.Result  # the same fields


class Refusal(Exception):
    """A request answered with success=false before it reached the engine; ``kind`` is a counter key."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


REQUEST_QOS = QoSProfile(
    depth=256,
    reliability=qos_profile_services_default.reliability,
    durability=qos_profile_services_default.durability,
    history=qos_profile_services_default.history,
)


def image_qos(name: str) -> QoSProfile:
    if name == "sensor_data":
        return qos_profile_sensor_data
    if name == "reliable":
        return QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    return qos_profile_system_default


class SurgeryR1Node(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        for p in PARAMETERS:
            self.declare_parameter(p.name, p.default, ParameterDescriptor(description=p.description))
        self.stats = NodeStats()
        self.loaded: LoadedEngine | None = None
        self.worker: InferenceWorker | None = None
        self.buffer = FrameBuffer(max(1, int(self.param("buffer_size"))), self._bad_frame)
        self._active = False
        self._state = "unconfigured"
        self._image_sub = None
        self._ask_srv = None
        self._ask_action: ActionServer | None = None
        self._answers_pub = None
        self._annotated_pub = None
        self._subscribed_topic = ""
        self._request_group = ReentrantCallbackGroup()  # many questions and goals in flight at once
        self._image_group = MutuallyExclusiveCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()
        # The worker wakes the executor through this when an answer is ready (see _run).
        self._wake = self.create_guard_condition(lambda: None, self._request_group)
        self.executor_kind = str(self.param("executor"))
        if self.executor_kind not in EXECUTOR_CHOICES:
            self.get_logger().error(f"executor {self.executor_kind!r} unknown; using 'single' ({EXECUTOR_CHOICES})")
            self.executor_kind = "single"
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(
            max(0.1, float(self.param("diagnostics_period_s"))), self._publish_diagnostics, self._timer_group
        )

    def param(self, name: str) -> Any:
        return self.get_parameter(name).value

    # -- lifecycle -------------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        log = self.get_logger()
        try:
            self._check_parameters()
        except ValueError as err:
            log.error(f"configure failed: {err}")
            return TransitionCallbackReturn.FAILURE
        model_path, backend, device = (str(self.param(k)) for k in ("model_path", "backend", "device"))
        log.info(f"loading model {model_path or '(built-in)'} with backend {backend!r} on device {device!r}")
        start = time.perf_counter()
        try:
            self.loaded = load_engine(
                model_path,
                backend,
                device,
                max_question_length=int(self.param("max_question_length")),
                own_process=bool(self.param("engine_process")),
            )
        except EngineLoadError as err:
            log.error(f"configure failed: {err}")
            return TransitionCallbackReturn.FAILURE
        except Exception as err:  # never let a broken model crash the process
            log.error(f"configure failed: unexpected {type(err).__name__} while loading the model: {err}")
            return TransitionCallbackReturn.FAILURE
        if self.param("warmup"):
            self._warmup()
        log.info(
            f"model {self.loaded.model} ready on {self.loaded.device} ({self.loaded.backend}) "
            f"in {time.perf_counter() - start:.1f} s"
        )
        self.buffer = FrameBuffer(int(self.param("buffer_size")), self._bad_frame)
        max_new_tokens = int(self.param("max_new_tokens"))
        self.worker = InferenceWorker(
            self.loaded.engine,
            int(self.param("max_queue")),
            encode_ahead=bool(self.param("encode_ahead")),
            newest_frame=lambda: self.buffer.newest(),
            frame_interval_s=self._frame_interval_s,
            max_new_tokens=max_new_tokens if max_new_tokens > 0 else None,
        )
        self.worker.start()
        self._answers_pub = self.create_lifecycle_publisher(GroundedAnswer, "~/answers", 10)
        self._annotated_pub = self.create_lifecycle_publisher(Image, "~/annotated_image", 2)
        if self._ask_srv is None:
            # A deep request history: a burst beyond max_queue is refused with a reason by the node, never
            # dropped unanswered by DDS (the default depth of 10 lost 2 of 10,000 fuzz requests at 12 in flight).
            self._ask_srv = self.create_service(AskQuestion, "~/ask", self._ask, callback_group=self._request_group,
                                                qos_profile=REQUEST_QOS)  # fmt: skip
        if self._ask_action is None:
            self._ask_action = ActionServer(
                self,
                AskAction,
                "~/ask_action",
                execute_callback=self._execute_goal,
                goal_callback=self._on_goal,
                cancel_callback=lambda _goal: CancelResponse.ACCEPT,
                callback_group=self._request_group,
            )
        self._state = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        compressed = bool(self.param("compressed"))
        topic = str(self.param("image_topic"))
        if compressed and not topic.endswith("/compressed"):
            topic = topic.rstrip("/") + "/compressed"
        msg_type = CompressedImage if compressed else Image
        self.buffer.clear()
        self._image_sub = self.create_subscription(
            msg_type,
            topic,
            self._on_compressed if compressed else self._on_image,
            image_qos(str(self.param("image_qos"))),
            callback_group=self._image_group,
        )
        self._subscribed_topic = self.resolve_topic_name(topic)
        self._active = True
        self._state = "active"
        self.get_logger().info(
            f"active: answering on {self.resolve_service_name('~/ask')} about {self._subscribed_topic} "
            f"({msg_type.__name__}, QoS {self.param('image_qos')}, executor {self.executor_kind})"
        )
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        if self._image_sub is not None:
            self.destroy_subscription(self._image_sub)
            self._image_sub = None
        self.buffer.clear()
        self._state = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._state = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in lifecycle state {state.label}: releasing the model")
        self._release()
        self._state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        """Stop intake and the worker, free the model, remove the outputs (any state to unconfigured)."""
        self._active = False
        if self._image_sub is not None:
            self.destroy_subscription(self._image_sub)
            self._image_sub = None
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.loaded is not None:
            with contextlib.suppress(Exception):
                self.loaded.engine.close()
            self.loaded = None
        for pub in (self._answers_pub, self._annotated_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._answers_pub = self._annotated_pub = None
        if self._ask_srv is not None:
            self.destroy_service(self._ask_srv)
            self._ask_srv = None
        if self._ask_action is not None:
            self._ask_action.destroy()
            self._ask_action = None
        self.buffer.clear()

    def _check_parameters(self) -> None:
        checks = [
            (int(self.param("buffer_size")) >= 1, "buffer_size must be at least 1"),
            (int(self.param("max_queue")) >= 1, "max_queue must be at least 1"),
            (int(self.param("max_question_length")) >= 1, "max_question_length must be at least 1"),
            (int(self.param("max_new_tokens")) >= 0, "max_new_tokens must be 0 (model default) or more"),
            (float(self.param("stamp_tolerance_s")) >= 0, "stamp_tolerance_s must be >= 0"),
            (float(self.param("max_frame_age_s")) > 0, "max_frame_age_s must be > 0"),
            (str(self.param("image_qos")) in QOS_CHOICES, f"image_qos must be one of {', '.join(QOS_CHOICES)}"),
            (bool(str(self.param("image_topic")).strip()), "image_topic is empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _warmup(self) -> None:
        """One question on a grey frame: the first real answer then runs at steady-state speed."""
        import numpy as np

        try:
            self.loaded.engine.ask(WARMUP_QUESTION, image=np.full((224, 280, 3), 128, np.uint8), stamp=("warmup",))
        except Exception as err:
            self.get_logger().warning(f"warm-up question failed ({type(err).__name__}: {err}); continuing")

    def _frame_interval_s(self) -> float | None:
        rate = self.stats.frame_rate()
        return 1.0 / rate if rate > 0 else None

    # -- camera intake (executor thread; never waits for the model) ------------------------------------
    def _on_image(self, msg: Image) -> None:
        now = time.monotonic()
        try:
            check_image(msg.height, msg.width, msg.encoding, msg.step, len(msg.data))
        except ImageError as err:
            self._bad_frame(err.reason, str(err))
            return
        convert = partial(image_to_rgb, msg.height, msg.width, msg.encoding, msg.step, msg.data)
        self._store(msg.header, msg.width, msg.height, convert, now)

    def _on_compressed(self, msg: CompressedImage) -> None:
        now = time.monotonic()
        try:
            width, height = check_compressed(msg.format, msg.data)  # the header only
        except ImageError as err:
            self._bad_frame(err.reason, str(err))
            return
        convert = partial(compressed_to_rgb, msg.format, msg.data)  # decoded on first use
        self._store(msg.header, width, height, convert, now, checked=False)

    def _store(self, header: Header, width: int, height: int, convert, now: float, checked: bool = True) -> None:
        frame = Frame(
            stamp_ns=msg_stamp_ns(header.stamp),
            frame_id=clean_frame_id(header.frame_id),
            received=now,
            width=width,
            height=height,
            convert=convert,
            checked=checked,
        )
        self.buffer.push(frame)
        self.stats.frame(now)
        if self.worker is not None:
            self.worker.frame_arrived()

    def _bad_frame(self, reason: str, message: str) -> None:
        self.stats.bad_frame(reason, message)
        self.get_logger().warning(f"skipping camera frame: {message}", throttle_duration_sec=5.0)

    # -- questions: the ~/ask service and the ~/ask_action action --------------------------------------
    async def _ask(self, request: AskQuestion.Request, response: AskQuestion.Response) -> AskQuestion.Response:
        received = time.perf_counter()
        try:
            job = self._admit(request, received)
            await self._run(job)
        except Refusal as refusal:
            return self._refuse(response, refusal, received)
        return self._respond(response, job)

    def _on_goal(self, goal: AskAction.Goal) -> GoalResponse:
        """Accept a goal only when it can be queued now; the reason for a rejection goes to the log and counters."""
        if not self._active or self.worker is None:
            kind, reason = "inactive", f"the node is {self._state}, not active: activate it to send goals"
        elif self.worker.full:
            kind, reason = "busy", f"busy: {self.worker.max_queue} questions are already waiting or being answered"
        else:
            return GoalResponse.ACCEPT
        self.stats.refusal(kind, reason)
        self.get_logger().warning(f"goal {goal.question[:60]!r} rejected: {reason}", throttle_duration_sec=1.0)
        return GoalResponse.REJECT

    async def _execute_goal(self, goal_handle: ServerGoalHandle) -> AskAction.Result:
        """A goal: the same job as a service request, with streamed feedback and cancel."""
        received = time.perf_counter()
        result = AskAction.Result()
        try:
            job = self._admit(goal_handle.request, received)
            job.on_token = partial(self._feedback, goal_handle)
            job.cancelled = lambda: goal_handle.is_cancel_requested
            await self._run(job)
        except Refusal as refusal:
            goal_handle.abort()
            return self._refuse(result, refusal, received)
        self._respond(result, job)
        if job.error_kind == "canceled":
            result.reasoning = job.progress.reasoning if job.progress else ""
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def _feedback(self, goal_handle: ServerGoalHandle, progress: Progress) -> None:
        """Called by the worker after every generated token."""
        try:
            goal_handle.publish_feedback(AskAction.Feedback(reasoning=progress.reasoning, tokens=progress.new_tokens))
        except Exception as err:  # the node is shutting down: the answer matters more than its feedback
            self.get_logger().debug(f"feedback not published: {err}")

    async def _run(self, job: Job) -> None:
        """Queue the job and wait for the worker without holding the executor: the single-threaded executor
        resumes this coroutine when the worker wakes it; under ``executor:=multi`` this callback's own thread
        waits. Raises Refusal("busy") when the queue is full."""
        future: Future | None = None
        if self.executor_kind == "single":
            future = Future()
            job.on_done = lambda j: (future.set_result(j), self._wake.trigger())
        try:
            self.worker.submit(job)
        except QueueFull as err:
            raise Refusal("busy", str(err)) from None
        if future is None:
            job.done.wait()
        else:
            await future

    def _admit(self, request: AskQuestion.Request | AskAction.Goal, received: float) -> Job:
        """Check the request and pick its frame, or raise Refusal with a message the caller can act on."""
        if not self._active or self.worker is None:
            raise Refusal("inactive", f"the node is {self._state}, not active: activate it to ask questions")
        try:
            question = check_question(request.question, int(self.param("max_question_length")))
        except InputError as err:
            raise Refusal("bad_question", str(err)) from None
        stamp_ns = msg_stamp_ns(request.stamp)
        try:
            frame = self.buffer.select(
                stamp_ns, float(self.param("stamp_tolerance_s")), float(self.param("max_frame_age_s"))
            )
        except FrameSelectionError as err:
            raise Refusal(err.reason, str(err)) from None
        job = Job(question=question, reasoning=bool(request.reasoning), frame=frame, received=received)
        job.frame_age_ms = frame.age() * 1000.0
        return job

    def _refuse(self, reply: Reply, refusal: Refusal, received: float) -> Reply:
        reply.success = False
        reply.error = str(refusal)
        reply.latency_ms = (time.perf_counter() - received) * 1000.0
        self.stats.refusal(refusal.kind, reply.error)
        return reply

    def _respond(self, reply: Reply, job: Job) -> Reply:
        """Fill a service response or an action result (the same fields) from a finished job."""
        frame = job.frame
        reply.image_header = self._header(frame)
        reply.frame_age_ms = job.frame_age_ms
        reply.inference_ms = job.inference_ms
        if job.error:
            reply.success = False
            reply.error = job.error
            reply.latency_ms = (time.perf_counter() - job.received) * 1000.0
            self.stats.refusal(job.error_kind, job.error)
            return reply
        ans = job.answer
        reply.answer = ans.answer or ""
        reply.reasoning = ans.reasoning or ""
        reply.coherent = bool(ans.coherent)
        reply.box = box_to_roi(ans.box)
        if reply.answer:
            reply.success = True
        else:
            problems = "; ".join(ans.problems) or "empty answer"
            reply.success = False
            reply.error = f"the model gave no readable answer ({problems})"
        reply.latency_ms = (time.perf_counter() - job.received) * 1000.0
        if reply.success:
            self.stats.answer(reply.latency_ms, job.inference_ms)
            threading.Thread(target=self._publish_answer, args=(job, reply), daemon=True).start()
        else:
            self.stats.refusal("no_answer", reply.error)
        return reply

    def _header(self, frame: Frame) -> Header:
        sec, nanosec = ns_to_stamp(frame.stamp_ns)
        return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id=frame.frame_id)

    def _publish_answer(self, job: Job, response: Reply) -> None:
        """~/answers and ~/annotated_image, off the executor and after the response went out."""
        try:
            if self._answers_pub is not None:
                self._answers_pub.publish(
                    GroundedAnswer(
                        header=response.image_header,
                        question=job.question,
                        answer=response.answer,
                        reasoning=response.reasoning,
                        box=response.box,
                        coherent=response.coherent,
                        latency_ms=response.latency_ms,
                        inference_ms=response.inference_ms,
                    )
                )
            pub = self._annotated_pub
            if pub is not None and self.param("publish_annotated") and pub.get_subscription_count() > 0:
                drawn = draw_answer(job.frame.rgb(), job.question, response.answer, job.answer.box, response.coherent)
                height, width, encoding, step, data = rgb_to_image_fields(drawn)
                pub.publish(
                    Image(
                        header=response.image_header,
                        height=height,
                        width=width,
                        encoding=encoding,
                        is_bigendian=0,
                        step=step,
                        data=data,
                    )
                )
        except Exception as err:  # publishing after shutdown or cleanup
            self.get_logger().debug(f"answer not published: {err}")

    # -- diagnostics -----------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        loaded = self.loaded
        status = self.stats.status(
            model=loaded.model if loaded else "(not loaded)",
            backend=loaded.backend if loaded else str(self.param("backend")),
            device=loaded.device if loaded else str(self.param("device")),
            state=self._state,
            max_frame_age_s=float(self.param("max_frame_age_s")),
            queue_depth=self.worker.depth if self.worker else 0,
        )
        values = dict(status.values)
        values["image_topic"] = self._subscribed_topic
        if loaded is not None:  # the model's process: this one, or the engine process (restarted if it died)
            engine_pid = loaded.engine.pid if isinstance(loaded.engine, ProcessEngine) else os.getpid()
            values["engine_pid"] = str(engine_pid)
        if self.worker is not None:
            values["encoded_ahead"] = str(self.worker.encoded_ahead)
            values["encode_ms"] = "nan" if self.worker.encode_ms is None else f"{self.worker.encode_ms:.1f}"
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status.append(
            DiagnosticStatus(
                level=bytes([status.level]),
                name=f"surgery_r1: {self.get_fully_qualified_name()}",
                message=status.message,
                hardware_id=values.get("model", ""),
                values=[KeyValue(key=k, value=v) for k, v in values.items()],
            )
        )
        with contextlib.suppress(Exception):
            self._diag_pub.publish(msg)


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = SurgeryR1Node()
    if node.executor_kind == "multi":
        executor = MultiThreadedExecutor(num_threads=int(node.param("max_queue")) + 3)
    else:
        executor = SingleThreadedExecutor()
    executor.add_node(node)
    code = 0
    try:
        if node.param("autostart"):
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
            else:
                node.get_logger().error(
                    "not configured: fix the parameters, then configure it through its lifecycle services "
                    f"(e.g. `ros2 lifecycle set {node.get_fully_qualified_name()} configure`)"
                )
        else:
            node.get_logger().info("autostart is false: waiting for a lifecycle manager to configure and activate")
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        with contextlib.suppress(Exception):
            node._release()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
