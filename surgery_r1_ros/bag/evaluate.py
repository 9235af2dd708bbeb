"""``bag eval``: replay a bag into the Surgery-R1 node, ask each ground-truth question at its stamp, report.

Flow: read the questions (the ``bag synth`` sidecar format), map each to the bag image whose header
stamp is nearest (questions outside the bag or with no image within the node's stamp tolerance are
counted, not asked), start the node (``--node start``: its own process, local-only DDS, built-in model
unless ``--model``) or use a running one, play the bag through :class:`BagPlayer`, and call ``~/ask``
with each question's stamp.

Pacing. ``pause`` (default): when the player has published a frame that questions are about, it holds
the bag clock until they are answered (re-sending that frame every second so the node never finds it
too old, and when the node has not got it yet), then carries on with the bag's timing. Every question
is asked about a frame the node has, so the numbers measure the model. ``realtime``: the bag plays at its
own pace and a second thread asks each question as soon as its frame was published, without holding
anything: questions whose frame left the node's buffer fail, as they would on a live robot.

Frames received by the node come from its ``/diagnostics`` status (``frames_received``). Every wait has a
timeout: service start-up, each call, playback (bag length plus holds), the asker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surgery_r1_ros.bag.reader import BagReader
from surgery_r1_ros.bag.report import AskedQuestion, EvalReport, spread
from surgery_r1_ros.bag.synth import load_questions, sidecar_path

log = logging.getLogger(__name__)

DEFAULT_IMAGE_TOPIC = "/jhu_daVinci/left/image_raw"
STAMP_TOLERANCE_S = 0.05  # the node's default stamp_tolerance_s


@dataclass
class EvalOptions:
    """How ``bag eval`` runs."""

    questions: Path | None = None
    node: str = "start"  # start | running
    node_name: str = "/surgery_r1"
    model: str | None = None
    image_topic: str | None = None
    pace: str = "pause"  # pause | realtime
    reasoning: bool = True
    max_questions: int | None = None
    rate: float = 1.0
    qos: str = "auto"
    timeout_s: float = 60.0
    startup_timeout_s: float = 120.0
    sheet: int = 12
    frames_dir: Path | None = None  # also write one annotated PNG per answered question here
    frames_limit: int = 0
    node_params: dict[str, str] = field(default_factory=dict)
    play_topics: list[str] | None = None  # None: every topic of the bag
    frame_wait_s: float = 3.0  # pause pace: retry a question this long while the node lacks its frame
    refresh_s: float = 1.0  # pause pace: re-send the held frame when it is older than this
    tolerance_s: float = STAMP_TOLERANCE_S
    domain_id: int | None = None  # --node start: DDS domain (random when None)
    on_answer: object = None  # callable(AskedQuestion) after each answer (the demo prints them)

    def check(self) -> None:
        if self.node not in ("start", "running"):
            raise ValueError(f"--node {self.node!r}: use start or running")
        if self.pace not in ("pause", "realtime"):
            raise ValueError(f"--pace {self.pace!r}: use pause or realtime")
        if self.max_questions is not None and self.max_questions < 1:
            raise ValueError("--max-questions must be >= 1")
        if self.timeout_s <= 0 or self.startup_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")
        if not self.node_name.startswith("/"):
            self.node_name = "/" + self.node_name


@dataclass
class EvalResult:
    report: EvalReport
    paths: dict
    node_log: Path | None = None

    def summary(self) -> str:
        lines = [self.report.summary()]
        lines += [f"  wrote {p}" for p in self.paths.values()]
        return "\n".join(lines)


# -- CDR peeking (no full decode on the playback path) -------------------------------------------------
def _endian(raw: bytes) -> str:
    return "<" if len(raw) > 1 and raw[1] & 1 else ">"


def header_stamp_ns(raw: bytes) -> int:
    """The ``header.stamp`` of a CDR message whose first field is a std_msgs/Header (Image, CameraInfo)."""
    sec, nanosec = struct.unpack_from(_endian(raw) + "iI", raw, 4)
    return sec * 1_000_000_000 + nanosec


def image_size_from_cdr(raw: bytes) -> tuple[int, int]:
    """(width, height) of a CDR sensor_msgs/Image without decoding its pixels."""
    e = _endian(raw)
    (length,) = struct.unpack_from(e + "I", raw, 12)  # frame_id length, after stamp (8 bytes at offset 4)
    offset = 16 + length
    offset += (-(offset - 4)) % 4  # align to 4 relative to the CDR body
    height, width = struct.unpack_from(e + "II", raw, offset)
    return int(width), int(height)


def decode_image(raw: bytes) -> np.ndarray:
    """RGB array of a CDR sensor_msgs/Image (rgb8, bgr8, mono8, rgba8, bgra8)."""
    from rosbags.typesys import Stores, get_typestore

    from surgery_r1_ros.node.image import image_to_rgb

    msg = get_typestore(Stores.ROS2_KILTED).deserialize_cdr(raw, "sensor_msgs/msg/Image")
    return np.array(image_to_rgb(msg.height, msg.width, msg.encoding, msg.step, msg.data))


# -- planning ---------------------------------------------------------------------------------------
def image_stamps(bag: Path, topic: str) -> tuple[list[int], tuple[int, int] | None]:
    """Header stamps of every message on the image topic, in bag order, and the (first) image size."""
    with BagReader(bag) as reader:
        info = reader.info
        assert info is not None
        names = {t.name: t for t in info.topics}
        if topic not in names:
            raise ValueError(
                f"{bag}: no image topic {topic!r}; topics: {', '.join(sorted(names)) or 'none'} (use --image-topic)"
            )
        if names[topic].msgtype not in ("sensor_msgs/msg/Image",):
            raise ValueError(f"{bag}: topic {topic} has type {names[topic].msgtype}, expected sensor_msgs/msg/Image")
        stamps: list[int] = []
        size = None
        for msg in reader.messages([topic]):
            try:
                stamps.append(header_stamp_ns(msg.data))
                size = size or image_size_from_cdr(msg.data)
            except struct.error:
                raise ValueError(f"{bag}: a message on {topic} is too short to be an image") from None
        return stamps, size


def plan_questions(
    rows: list[dict], stamps: list[int], bag_start_ns: int, tolerance_s: float, max_questions: int | None = None
) -> tuple[list[AskedQuestion], dict[int, list[AskedQuestion]]]:
    """Turn question rows into AskedQuestion records; group the askable ones by the image stamp they hit."""
    tolerance = int(tolerance_s * 1e9)
    ordered = np.array(sorted(set(stamps)), dtype=np.int64)
    questions = []
    for i, row in enumerate(rows):
        stamp = int(row["stamp_ns"]) if "stamp_ns" in row else bag_start_ns + round(float(row["t"]) * 1e9)
        t = float(row.get("t", (stamp - bag_start_ns) / 1e9))
        box = row.get("box")
        questions.append(
            AskedQuestion(
                index=i,
                question=str(row["question"]),
                truth=str(row.get("answer", "")),
                truth_box=[float(v) for v in box] if box else None,
                image_size=[int(v) for v in row["image_size"]] if row.get("image_size") else None,
                stamp_ns=stamp,
                t=t,
                subject=row.get("subject"),
                kind=row.get("kind"),
            )
        )
    groups: dict[int, list[AskedQuestion]] = {}
    for q in questions:
        if ordered.size == 0:
            q.skipped = "the bag has no images"
            continue
        if q.stamp_ns < ordered[0] - tolerance or q.stamp_ns > ordered[-1] + tolerance:
            q.skipped = "outside the bag's time range"
            continue
        pos = int(np.searchsorted(ordered, q.stamp_ns))
        near = [ordered[j] for j in (pos - 1, pos) if 0 <= j < ordered.size]
        best = int(min(near, key=lambda s: abs(int(s) - q.stamp_ns)))
        if abs(best - q.stamp_ns) > tolerance:
            q.skipped = f"no image within {tolerance_s * 1e3:.0f} ms of the stamp"
            continue
        groups.setdefault(best, []).append(q)
    if max_questions is not None:
        keep = {id(q) for q in choose_questions(groups, max_questions)}
        for g in groups.values():
            for q in g:
                if id(q) not in keep:
                    q.skipped = "left out by --max-questions"
        groups = {s: [q for q in g if id(q) in keep] for s, g in groups.items()}
        groups = {s: g for s, g in groups.items() if g}
    return questions, groups


def choose_questions(groups: dict[int, list[AskedQuestion]], count: int) -> list[AskedQuestion]:
    """``count`` questions spread over the stamps, rotating organ / state / location questions."""
    kinds = ("organ", "state", "location")
    left = {s: list(g) for s, g in groups.items()}
    picked: list[AskedQuestion] = []
    while len(picked) < count:
        available = [s for s in sorted(left) if left[s]]
        if not available:
            break
        for stamp in spread(available, count - len(picked)):
            want = kinds[len(picked) % len(kinds)]
            pool = left[stamp]
            q = next((q for q in pool if q.kind == want), pool[0])
            pool.remove(q)
            picked.append(q)
    return picked


# -- the node process ---------------------------------------------------------------------------------
def node_command(options: EvalOptions, image_topic: str) -> list[str]:
    exe = Path(sys.executable).parent / "surgery_r1_node"
    cmd = (
        [str(exe)]
        if exe.exists()
        else (
            [found]
            if (found := shutil.which("surgery_r1_node"))
            else [sys.executable, "-m", "surgery_r1_ros.node.node"]
        )
    )
    namespace, _, name = options.node_name.rpartition("/")
    args = ["--ros-args", "-r", f"__node:={name}"]
    if namespace:
        args += ["-r", f"__ns:={namespace}"]
    params = {"image_topic": image_topic}
    if options.pace == "pause":
        # playback holds at a question frame while its questions are answered, longer than the default
        # max_frame_age_s (2 s) allows; a replayed bag has not stalled, so lift the limit for this node
        params["max_frame_age_s"] = "3600.0"
    if options.model:
        params["model_path"] = str(options.model)
    params.update(options.node_params)
    for key, value in params.items():
        args += ["-p", f"{key}:={value}"]
    return cmd + args


class _Client:
    """Our side of the ROS graph: ~/ask client, /diagnostics listener, spun by a thread."""

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

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if "frames_received" in values and (self.base in status.name or self.base in status.hardware_id):
                with contextlib.suppress(ValueError):
                    self.frames_received = int(values["frames_received"])
                    self.diagnostics_seen.set()

    def wait_for_service(self, timeout: float, alive=lambda: True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.client.wait_for_service(timeout_sec=0.2):
                return True
            if not alive():
                return False
        return False

    def ask(self, question: str, stamp_ns: int, reasoning: bool, timeout: float):
        """Call ~/ask; returns (response or None on timeout, round trip ms)."""
        request = self.AskQuestion.Request()
        request.question = question
        request.reasoning = reasoning
        request.stamp.sec, request.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
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


def _fill(q: AskedQuestion, response, round_trip_ms: float, size: tuple[int, int]) -> None:
    q.asked = True
    q.round_trip_ms = round_trip_ms
    if response is None:
        q.success = False
        q.error = "timeout: no response within the per-question timeout"
        return
    q.success = bool(response.success)
    q.error = response.error
    q.answer = response.answer
    q.reasoning = response.reasoning
    roi = response.box
    q.box = (
        [float(roi.x_offset), float(roi.y_offset), float(roi.x_offset + roi.width), float(roi.y_offset + roi.height)]
        if roi.width > 0 and roi.height > 0
        else None
    )
    q.answered_size = list(size)
    q.coherent = bool(response.coherent) if q.success else None
    q.latency_ms = float(response.latency_ms)
    q.inference_ms = float(response.inference_ms)
    q.frame_age_ms = float(response.frame_age_ms)
    stamp = response.image_header.stamp
    q.answered_stamp_ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


# -- the run --------------------------------------------------------------------------------------------
def run_eval(bag: str | Path, out: str | Path, options: EvalOptions | None = None) -> EvalResult:
    """Evaluate the node on ``bag``; writes the report to ``out`` and returns it."""
    from surgery_r1_ros.bag.play import BagPlayer, PlayOptions
    from surgery_r1_ros.bag.ros_env import clean_shm, safe_dds, shm_snapshot, start_process, stop_process

    options = options or EvalOptions()
    options.check()
    bag, out = Path(bag), Path(out)
    started = time.monotonic()
    questions_file = Path(options.questions) if options.questions else sidecar_path(bag)
    if not questions_file.exists():
        raise FileNotFoundError(
            f"questions file {questions_file} does not exist (give --questions; `bag synth` writes BAG.questions.jsonl)"
        )
    rows = load_questions(questions_file)
    image_topic = options.image_topic or DEFAULT_IMAGE_TOPIC
    with BagReader(bag) as reader:
        info = reader.info
        assert info is not None
    stamps, size = image_stamps(bag, image_topic)
    questions, groups = plan_questions(rows, stamps, info.start_ns, options.tolerance_s, options.max_questions)
    if not groups:
        skipped = {q.skipped for q in questions}
        raise ValueError(
            f"{questions_file}: none of its {len(questions)} questions can be asked on {bag} "
            f"({'; '.join(sorted(skipped))}); the bag's images span "
            f"{(stamps[0] if stamps else 0) / 1e9:.3f}..{(stamps[-1] if stamps else 0) / 1e9:.3f} s"
        )
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    report = EvalReport(
        bag=str(bag),
        questions_file=str(questions_file),
        model=str(options.model or "built-in") if options.node == "start" else "(running node)",
        node=f"{options.node} {options.node_name}",
        pace=options.pace,
        reasoning=options.reasoning,
        questions=questions,
    )
    shm_before = shm_snapshot()
    proc = None
    node_log = None
    env_ctx = safe_dds(options.domain_id) if options.node == "start" else contextlib.nullcontext(None)
    with env_ctx as env:
        client = None
        try:
            if options.node == "start":
                logs.mkdir(parents=True, exist_ok=True)
                node_log = logs / "node.log"
                env = dict(env)
                env["PYTHONUNBUFFERED"] = "1"
                env["RCUTILS_COLORIZED_OUTPUT"] = "0"
                cmd = node_command(options, image_topic)
                log.info("starting the node: %s", " ".join(cmd))
                proc = start_process(cmd, env, node_log)
            domain = int(env["ROS_DOMAIN_ID"]) if env else None
            client = _Client(options.node_name, domain)

            def alive() -> bool:
                return proc is None or proc.poll() is None

            if not client.wait_for_service(options.startup_timeout_s, alive):
                tail = _tail(node_log) if node_log else ""
                why = (
                    f"exited with code {proc.returncode}"
                    if proc is not None and proc.poll() is not None
                    else (f"did not offer {options.node_name}/ask within {options.startup_timeout_s:g} s")
                )
                raise RuntimeError(f"the node {why}" + (f"; last lines of {node_log}:\n{tail}" if tail else ""))
            log.info("%s/ask is up after %.1f s", options.node_name, time.monotonic() - started)
            client.diagnostics_seen.wait(2.5)
            baseline = (client.frames_received or 0) if options.node == "running" else 0

            player = BagPlayer(
                client.node,
                bag,
                PlayOptions(rate=options.rate, topics=options.play_topics, qos=options.qos, skip_missing_types=True),
            )
            player.prepare()
            if image_topic not in player.publishers:
                raise ValueError(f"{bag}: the image topic {image_topic} is not played (check --image-topic)")
            image_pub = player.publishers[image_topic]
            if not _wait(lambda: image_pub.get_subscription_count() > 0, 10.0):
                raise RuntimeError(
                    f"nothing subscribes to {image_topic} after 10 s: is the node's image_topic the same?"
                )
            state = {"republished": 0, "played": 0}
            # a node we started accepts old frames (see node_command); a running one may not: re-send the
            # held frame now and then so it stays younger than the node's max_frame_age_s
            refresh = options.node == "running"

            def ask_group(group: list[AskedQuestion], raw: bytes, published_at: float, hold: bool) -> None:
                last_sent = published_at
                for q in group:
                    if not alive():
                        q.asked, q.error = True, f"node exited (code {proc.returncode}); see {node_log}"
                        continue
                    deadline = time.monotonic() + options.frame_wait_s
                    while True:
                        if refresh and time.monotonic() - last_sent > options.refresh_s:
                            image_pub.publish(raw)
                            state["republished"] += 1
                            last_sent = time.monotonic()
                        q.attempts += 1
                        response, trip = client.ask(q.question, q.stamp_ns, options.reasoning, options.timeout_s)
                        _fill(q, response, trip, size)
                        if q.success or response is None or not hold or time.monotonic() >= deadline or not alive():
                            break
                        time.sleep(0.1)
                        image_pub.publish(raw)  # the node may have missed it (best effort): send it again
                        state["republished"] += 1
                        last_sent = time.monotonic()
                    if callable(options.on_answer):
                        options.on_answer(q)

            stop = threading.Event()
            if options.pace == "pause":

                def on_message(msg) -> None:
                    if msg.topic != image_topic:
                        return
                    state["played"] += 1
                    group = groups.get(header_stamp_ns(msg.data))
                    if group:
                        ask_group(group, msg.data, time.monotonic(), hold=True)

                stats = player.play(stop, on_message)
            else:
                published: dict[int, tuple[bytes, float]] = {}
                cond = threading.Condition()
                finished = threading.Event()

                def on_message(msg) -> None:
                    if msg.topic != image_topic:
                        return
                    state["played"] += 1
                    stamp = header_stamp_ns(msg.data)
                    if stamp in groups:
                        with cond:
                            published[stamp] = (msg.data, time.monotonic())
                            cond.notify_all()

                longest = (info.duration_s / options.rate) + 30.0

                def asker() -> None:
                    for stamp in sorted(groups):
                        with cond:
                            cond.wait_for(lambda s=stamp: s in published or finished.is_set(), timeout=longest)
                        if stamp not in published:
                            for q in groups[stamp]:
                                q.asked, q.error = True, "its frame was never played"
                            continue
                        raw, at = published[stamp]
                        ask_group(groups[stamp], raw, at, hold=False)

                thread = threading.Thread(target=asker, name="eval-asker", daemon=True)
                thread.start()
                try:
                    stats = player.play(stop, on_message)
                finally:
                    finished.set()
                    with cond:
                        cond.notify_all()
                asked_left = sum(len(g) for g in groups.values())
                thread.join(asked_left * (options.timeout_s + 1) + 5)
                if thread.is_alive():
                    report.notes.append("the asker thread did not finish in time; its last questions are missing")
            report.frames_played = state["played"]
            report.frames_republished = state["republished"]
            report.play = stats.as_dict()
            # the node reports frames_received once per diagnostics period: wait for a fresh one
            client.diagnostics_seen.clear()
            client.diagnostics_seen.wait(2.5)
            if client.frames_received is not None:
                report.frames_received = client.frames_received - baseline
            else:
                report.notes.append("no /diagnostics status from the node: frames received unknown")
        finally:
            if client is not None:
                client.close()
            if proc is not None:
                code = stop_process(proc, timeout=15.0)
                log.info("node stopped (exit code %s)", code)
            removed = clean_shm(shm_before) if options.node == "start" else []
            if removed:
                log.debug("removed %d stale Fast DDS shm files", len(removed))
    report.wall_s = time.monotonic() - started
    report.notes.append(
        f"stamp tolerance {options.tolerance_s * 1e3:.0f} ms; {report.frames_republished} frame re-sends while holding"
    )
    frames = _frames_for(bag, image_topic, report, options)
    paths = report.write(out, frames, options.sheet)
    if options.frames_dir is not None and options.frames_limit > 0:
        paths["frames"] = write_frames(report, frames, Path(options.frames_dir))
    return EvalResult(report, paths, node_log)


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _frames_for(bag: Path, topic: str, report: EvalReport, options: EvalOptions) -> dict[int, np.ndarray]:
    """RGB frames for the sheet (and the per-answer PNGs), keyed by question index; read back from the bag."""
    wanted = report.sheet_questions(options.sheet)
    if options.frames_dir is not None and options.frames_limit > 0:
        wanted = list(
            {id(q): q for q in wanted + spread([q for q in report.questions if q.asked], options.frames_limit)}.values()
        )
    by_stamp: dict[int, list[AskedQuestion]] = {}
    for q in wanted:
        by_stamp.setdefault(q.answered_stamp_ns or q.stamp_ns, []).append(q)
    frames: dict[int, np.ndarray] = {}
    if not by_stamp:
        return frames
    tolerance = int(options.tolerance_s * 1e9)
    with BagReader(bag) as reader:
        for msg in reader.messages([topic]):
            stamp = header_stamp_ns(msg.data)
            hits = [s for s in by_stamp if abs(s - stamp) <= tolerance]
            if not hits:
                continue
            rgb = decode_image(msg.data)
            for s in hits:
                for q in by_stamp.pop(s):
                    frames[q.index] = rgb
            if not by_stamp:
                break
    return frames


def write_frames(report: EvalReport, frames: dict[int, np.ndarray], folder: Path) -> Path:
    """One annotated PNG per asked question that has a frame (truth green, prediction red, reasoning)."""
    import cv2

    from surgery_r1_ros.bag.report import annotate

    folder.mkdir(parents=True, exist_ok=True)
    for q in report.questions:
        rgb = frames.get(q.index)
        if rgb is None or not q.asked:
            continue
        name = f"t{q.t:07.3f}_q{q.index:03d}.png"
        cv2.imwrite(str(folder / name), cv2.cvtColor(annotate(rgb, q, with_reasoning=True), cv2.COLOR_RGB2BGR))
    return folder


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
