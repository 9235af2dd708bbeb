"""``bag eval``: replay a bag into the Surgery-R1 node, ask each ground-truth question at its stamp, report.

Flow: read the questions (the ``bag synth`` sidecar format) and plan which image each is about
(``plan.plan_questions``); start the node (``--node start``: its own process, local-only DDS, built-in model
unless ``--model``) or use a running one; play the bag through :class:`BagPlayer` and call ``~/ask`` with
each question's stamp; write the report (``report.EvalReport``).

Pacing. ``pause`` (default): when the player has published a frame that questions are about, it holds
the bag clock until they are answered (re-sending that frame when the node has not got it yet), then
carries on with the bag's timing. Every question is asked about a frame the node has, so the numbers
measure the model. ``realtime``: the bag plays at its own pace and a second thread asks each question as
soon as its frame was published, without holding anything: questions whose frame left the node's buffer
fail, as they would on a live robot.

Frames received by the node come from its ``/diagnostics`` status (``frames_received``). Every wait has a
timeout: service start-up, each call, playback (bag length plus holds), the asker thread.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from surgery_r1_ros.bag.cdr import decode_image, header_stamp_ns
from surgery_r1_ros.bag.reader import BagReader, bag_info
from surgery_r1_ros.bag.ros_env import clean_shm, safe_dds, shm_snapshot, start_process, stop_process, wait_until
from surgery_r1_ros.bag.synth import load_questions, sidecar_path
from surgery_r1_ros.bag_eval.client import AskClient, fill_answer
from surgery_r1_ros.bag_eval.plan import image_stamps, plan_questions
from surgery_r1_ros.bag_eval.report import AskedQuestion, EvalReport, annotate, spread
from surgery_r1_ros.ros_fields import ns_to_seconds, seconds_to_ns

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
    on_answer: Callable[[AskedQuestion], None] | None = None  # after each answer (the demo prints them)

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


def node_command(options: EvalOptions, image_topic: str) -> list[str]:
    """The command line that starts the node for ``--node start``."""
    exe = Path(sys.executable).parent / "surgery_r1_node"
    if exe.exists():
        cmd = [str(exe)]
    elif found := shutil.which("surgery_r1_node"):
        cmd = [found]
    else:
        cmd = [sys.executable, "-m", "surgery_r1_ros.node.node"]
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


class BagEvaluation:
    """One ``bag eval`` run. Construction reads and plans (errors before any process starts); ``run()`` does
    the rest: node up, bag played while the questions are asked, node down, report written."""

    def __init__(self, bag: str | Path, out: str | Path, options: EvalOptions | None = None) -> None:
        self.options = options = options or EvalOptions()
        options.check()
        self.bag, self.out = Path(bag), Path(out)
        self.started = time.monotonic()
        self.questions_file = Path(options.questions) if options.questions else sidecar_path(self.bag)
        if not self.questions_file.exists():
            raise FileNotFoundError(
                f"questions file {self.questions_file} does not exist "
                "(give --questions; `bag synth` writes BAG.questions.jsonl)"
            )
        rows = load_questions(self.questions_file)
        self.image_topic = options.image_topic or DEFAULT_IMAGE_TOPIC
        self.info = bag_info(self.bag)
        stamps, self.size = image_stamps(self.bag, self.image_topic)
        questions, self.groups = plan_questions(
            rows, stamps, self.info.start_ns, options.tolerance_s, options.max_questions
        )
        if not self.groups:
            span = f"{ns_to_seconds(stamps[0]):.3f}..{ns_to_seconds(stamps[-1]):.3f} s" if stamps else "nothing"
            raise ValueError(
                f"{self.questions_file}: none of its {len(questions)} questions can be asked on {self.bag} "
                f"({'; '.join(sorted({q.skipped for q in questions}))}); the bag's images span {span}"
            )
        self.starts_node = options.node == "start"
        self.report = EvalReport(
            bag=str(self.bag),
            questions_file=str(self.questions_file),
            model=str(options.model or "built-in") if self.starts_node else "(running node)",
            node=f"{options.node} {options.node_name}",
            pace=options.pace,
            reasoning=options.reasoning,
            questions=questions,
        )
        self.proc = None
        self.node_log: Path | None = None
        self.client: AskClient | None = None
        self.image_pub: Any = None

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> EvalResult:
        """Evaluate the node on the bag; writes the report to ``out`` and returns it."""
        self.out.mkdir(parents=True, exist_ok=True)
        with self._node_and_client():
            baseline = (self.client.frames_received or 0) if not self.starts_node else 0
            player = self._player()
            stats = self._play_paused(player) if self.options.pace == "pause" else self._play_realtime(player)
            self.report.play = stats.as_dict()
            self._read_frames_received(baseline)
        report = self.report
        report.wall_s = time.monotonic() - self.started
        report.notes.append(
            f"stamp tolerance {self.options.tolerance_s * 1e3:.0f} ms; "
            f"{report.frames_republished} frame re-sends while holding"
        )
        frames = self._frames_for_pictures()
        paths = report.write(self.out, frames, self.options.sheet)
        if self.options.frames_dir is not None and self.options.frames_limit > 0:
            paths["frames"] = write_frames(report, frames, Path(self.options.frames_dir))
        return EvalResult(report, paths, self.node_log)

    @contextlib.contextmanager
    def _node_and_client(self) -> Iterator[None]:
        """Start the node (``--node start``, local-only DDS) and our client; stop and clean both afterwards."""
        shm_before = shm_snapshot()
        dds = safe_dds(self.options.domain_id) if self.starts_node else contextlib.nullcontext(None)
        with dds as env:
            try:
                if self.starts_node:
                    logs = self.out / "logs"
                    logs.mkdir(parents=True, exist_ok=True)
                    self.node_log = logs / "node.log"
                    cmd = node_command(self.options, self.image_topic)
                    log.info("starting the node: %s", " ".join(cmd))
                    node_env = {**env, "PYTHONUNBUFFERED": "1", "RCUTILS_COLORIZED_OUTPUT": "0"}
                    self.proc = start_process(cmd, node_env, self.node_log)
                self.client = AskClient(self.options.node_name, int(env["ROS_DOMAIN_ID"]) if env else None)
                self._wait_for_node()
                yield
            finally:
                if self.client is not None:
                    self.client.close()
                if self.proc is not None:
                    log.info("node stopped (exit code %s)", stop_process(self.proc, timeout=15.0))
                if self.starts_node:
                    clean_shm(shm_before)

    def _alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def _wait_for_node(self) -> None:
        timeout = self.options.startup_timeout_s
        if not self.client.wait_for_service(timeout, self._alive):
            exited = self.proc is not None and self.proc.poll() is not None
            why = f"exited with code {self.proc.returncode}" if exited else (
                f"did not offer {self.options.node_name}/ask within {timeout:g} s"
            )  # fmt: skip
            tail = _tail(self.node_log)
            raise RuntimeError(f"the node {why}" + (f"; last lines of {self.node_log}:\n{tail}" if tail else ""))
        log.info("%s/ask is up after %.1f s", self.options.node_name, time.monotonic() - self.started)
        self.client.diagnostics_seen.wait(2.5)

    def _player(self):
        from surgery_r1_ros.bag.play import BagPlayer, PlayOptions

        opts = self.options
        player = BagPlayer(
            self.client.node,
            self.bag,
            PlayOptions(rate=opts.rate, topics=opts.play_topics, qos=opts.qos, skip_missing_types=True),
        )
        player.prepare()
        if self.image_topic not in player.publishers:
            raise ValueError(f"{self.bag}: the image topic {self.image_topic} is not played (check --image-topic)")
        self.image_pub = player.publishers[self.image_topic]
        if not wait_until(lambda: self.image_pub.get_subscription_count() > 0, 10.0):
            raise RuntimeError(
                f"nothing subscribes to {self.image_topic} after 10 s: is the node's image_topic the same?"
            )
        return player

    def _read_frames_received(self, baseline: int) -> None:
        """The node reports frames_received once per diagnostics period: wait for a fresh one."""
        self.client.diagnostics_seen.clear()
        self.client.diagnostics_seen.wait(2.5)
        if self.client.frames_received is not None:
            self.report.frames_received = self.client.frames_received - baseline
        else:
            self.report.notes.append("no /diagnostics status from the node: frames received unknown")

    # -- playing and asking --------------------------------------------------------------------------
    def _play_paused(self, player):
        """Hold the bag at every question frame until its questions are answered."""

        def on_message(msg) -> None:
            if msg.topic == self.image_topic:
                self.report.frames_played += 1
                group = self.groups.get(header_stamp_ns(msg.data))
                if group:
                    self._ask_group(group, msg.data, time.monotonic(), hold=True)

        return player.play(threading.Event(), on_message)

    def _play_realtime(self, player):
        """Play at the bag's pace; an asker thread asks about each question frame once it was published."""
        published: dict[int, tuple[bytes, float]] = {}
        cond = threading.Condition()
        finished = threading.Event()

        def on_message(msg) -> None:
            if msg.topic != self.image_topic:
                return
            self.report.frames_played += 1
            stamp = header_stamp_ns(msg.data)
            if stamp in self.groups:
                with cond:
                    published[stamp] = (msg.data, time.monotonic())
                    cond.notify_all()

        longest = self.info.duration_s / self.options.rate + 30.0

        def asker() -> None:
            for stamp in sorted(self.groups):
                with cond:
                    cond.wait_for(lambda s=stamp: s in published or finished.is_set(), timeout=longest)
                if stamp not in published:
                    for q in self.groups[stamp]:
                        self._fail(q, "its frame was never played")
                    continue
                raw, at = published[stamp]
                self._ask_group(self.groups[stamp], raw, at, hold=False)

        thread = threading.Thread(target=asker, name="eval-asker", daemon=True)
        thread.start()
        try:
            stats = player.play(threading.Event(), on_message)
        finally:
            finished.set()
            with cond:
                cond.notify_all()
        thread.join(sum(len(g) for g in self.groups.values()) * (self.options.timeout_s + 1) + 5)
        if thread.is_alive():
            self.report.notes.append("the asker thread did not finish in time; its last questions are missing")
        return stats

    def _ask_group(self, group: list[AskedQuestion], raw: bytes, published_at: float, hold: bool) -> None:
        """Ask a frame's questions. ``hold``: retry while the node lacks the frame, re-sending it (until then its
        answer may be about a neighbouring frame within the stamp tolerance)."""
        opts = self.options
        frame_stamp = header_stamp_ns(raw)
        # a node we started accepts old frames (see node_command); a running one may not: re-send the held
        # frame now and then so it stays younger than the node's max_frame_age_s
        refresh = not self.starts_node
        last_sent = published_at
        for q in group:
            if not self._alive():
                self._fail(q, f"node exited (code {self.proc.returncode}); see {self.node_log}")
                continue
            deadline = time.monotonic() + opts.frame_wait_s
            while True:
                if refresh and time.monotonic() - last_sent > opts.refresh_s:
                    last_sent = self._resend(raw)
                q.attempts += 1
                response, trip = self.client.ask(q.question, q.stamp_ns, opts.reasoning, opts.timeout_s)
                fill_answer(q, response, trip, self.size)
                about_the_frame = q.success and q.answered_stamp_ns == frame_stamp
                if about_the_frame or not hold or response is None or time.monotonic() >= deadline or not self._alive():
                    break
                time.sleep(0.1)
                last_sent = self._resend(raw)  # the node may have missed it (best effort): send it again
            if callable(opts.on_answer):
                opts.on_answer(q)

    def _resend(self, raw: bytes) -> float:
        self.image_pub.publish(raw)
        self.report.frames_republished += 1
        return time.monotonic()

    def _fail(self, q: AskedQuestion, error: str) -> None:
        q.asked, q.success, q.error = True, False, error
        q.answered_size = list(self.size) if self.size else None

    # -- pictures ------------------------------------------------------------------------------------
    def _frames_for_pictures(self) -> dict[int, np.ndarray]:
        """RGB frames for the sheet (and the per-answer PNGs), keyed by question index; read back from the bag."""
        report, opts = self.report, self.options
        wanted = report.sheet_questions(opts.sheet)
        if opts.frames_dir is not None and opts.frames_limit > 0:
            asked = [q for q in report.questions if q.asked]
            wanted = list({id(q): q for q in wanted + spread(asked, opts.frames_limit)}.values())
        by_stamp: dict[int, list[AskedQuestion]] = {}
        for q in wanted:
            by_stamp.setdefault(q.answered_stamp_ns or q.stamp_ns, []).append(q)
        frames: dict[int, np.ndarray] = {}
        tolerance = seconds_to_ns(opts.tolerance_s)
        with BagReader(self.bag) as reader:
            for msg in reader.messages([self.image_topic]):
                if not by_stamp:
                    break
                stamp = header_stamp_ns(msg.data)
                hits = [s for s in by_stamp if abs(s - stamp) <= tolerance]
                if hits:
                    rgb = decode_image(msg.data)
                    for s in hits:
                        for q in by_stamp.pop(s):
                            frames[q.index] = rgb
        return frames


def run_eval(bag: str | Path, out: str | Path, options: EvalOptions | None = None) -> EvalResult:
    """Evaluate the node on ``bag``; writes the report to ``out`` and returns it."""
    return BagEvaluation(bag, out, options).run()


def write_frames(report: EvalReport, frames: dict[int, np.ndarray], folder: Path) -> Path:
    """One annotated PNG per asked question that has a frame (truth green, prediction red, reasoning)."""
    import cv2

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
