"""The node in a real ROS 2 graph: a node process, this test process as camera and clients, DDS local only.

One node process serves every case here (a scripted engine, ``tests/fake_engines.py``, answers in ~20 ms
so the node's own behaviour is what is tested): round trip, frame choice by stamp, encodings, bad
frames, bad questions, an engine fault, a stale stream, and 4 concurrent clients while 1280x1024 frames
stream at 30 Hz. The real model is exercised in test_node_lifecycle.py.
"""

from __future__ import annotations

import array
import os
import signal
import statistics
import sys
import threading
import time

import numpy as np
import pytest
from ros_helpers import ros_available, ros_session, wait_for

from surgery_r1_ros.ros_fields import msg_stamp_ns, ns_to_seconds, ns_to_stamp, seconds_to_ns

pytestmark = [
    pytest.mark.ros,
    pytest.mark.skipif(not ros_available(), reason="rclpy is not installed"),
    pytest.mark.timeout(300),
]

TOPIC = "/test_rig/left/image_raw"
MAX_FRAME_AGE_S = 1.5
TOLERANCE_S = 0.02
MAX_QUEUE = 3
COLOUR = (200, 100, 50)  # R, G, B of the encoding frames


class Rig:
    """This process's side of the graph: a camera publisher, the ask client and the node's outputs."""

    def __init__(self, ros, node_name: str = "surgery_r1") -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from surgery_r1_interfaces.msg import GroundedAnswer
        from surgery_r1_interfaces.srv import AskQuestion

        self.ros = ros
        self.AskQuestion = AskQuestion
        node = ros.node
        # reliable publisher: matches the node's best-effort subscription; nothing is lost locally
        self.camera = node.create_publisher(Image, TOPIC, QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self.client = node.create_client(AskQuestion, f"/{node_name}/ask")
        self.answers: list = []
        self.annotated: list = []
        self.diagnostics: list = []
        node.create_subscription(GroundedAnswer, f"/{node_name}/answers", self.answers.append, 10)
        node.create_subscription(Image, f"/{node_name}/annotated_image", self.annotated.append, 2)
        node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)

    def publish(
        self,
        stamp_s: float,
        encoding: str = "rgb8",
        width: int = 64,
        height: int = 48,
        data: bytes | None = None,
        step: int | None = None,
        frame_id: str = "/camera_left",
    ) -> None:
        from sensor_msgs.msg import Image

        msg = Image(height=height, width=width, encoding=encoding)
        msg.header.stamp.sec, msg.header.stamp.nanosec = ns_to_stamp(seconds_to_ns(stamp_s))
        msg.header.frame_id = frame_id
        if data is None:
            data = encode(np.full((height, width, 3), COLOUR, np.uint8), encoding)
            step = len(data) // height
        msg.step = step if step is not None else len(data) // height
        buf = array.array("B")
        buf.frombytes(data)
        msg.data = buf
        self.camera.publish(msg)

    def ask(self, question: str = "Where is suction located?", stamp_s: float = 0.0, reasoning: bool = False,
            client=None, timeout: float = 30.0):  # fmt: skip
        req = self.AskQuestion.Request(question=question, reasoning=reasoning)
        req.stamp.sec, req.stamp.nanosec = ns_to_stamp(seconds_to_ns(stamp_s))
        response = self.ros.call(client or self.client, req, timeout)
        assert response is not None, f"no response to {question!r} within {timeout} s"
        return response

    def ask_when_ready(self, stamp_s: float, **kw):
        """Ask about a just-published frame, retrying while it is still on its way."""
        deadline = time.monotonic() + 10
        while True:
            response = self.ask(stamp_s=stamp_s, **kw)
            if response.success or "no buffered frame" not in response.error or time.monotonic() > deadline:
                return response
            time.sleep(0.05)

    def latest_diagnostics(self) -> dict[str, str]:
        assert wait_for(lambda: self.diagnostics, 10), "no /diagnostics"
        status = self.diagnostics[-1].status[0]
        return {kv.key: kv.value for kv in status.values} | {"_level": status.level[0], "_message": status.message}


def encode(rgb: np.ndarray, encoding: str) -> bytes:
    alpha = np.full((*rgb.shape[:2], 1), 255, np.uint8)
    return (
        {
            "rgb8": rgb,
            "bgr8": rgb[:, :, ::-1],
            "rgba8": np.concatenate([rgb, alpha], axis=2),
            "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], axis=2),
            "mono8": rgb[:, :, :1],
        }[encoding]
        .copy()
        .tobytes()
    )


def camera_sent(camera) -> int:
    """Frames fake_camera.py reports sent so far (it prints "sent N" every second)."""
    counts = [int(line.split()[1]) for line in camera.output().splitlines() if line.startswith("sent ")]
    return counts[-1] if counts else 0


def stamp_of(header) -> float:
    return ns_to_seconds(msg_stamp_ns(header.stamp))


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    with ros_session(tmp_path_factory.mktemp("test_node")) as ros:
        ros.env["FAKE_ENGINE_DELAY_S"] = "0.02"
        args = {
            "backend": "fake_engines:ScriptedEngine",
            "image_topic": TOPIC,
            "max_frame_age_s": MAX_FRAME_AGE_S,
            "stamp_tolerance_s": TOLERANCE_S,
            "max_queue": MAX_QUEUE,
            "diagnostics_period_s": 0.5,
            "buffer_size": 12,
        }
        cmd = ["-m", "surgery_r1_ros.node.node", "--ros-args"]
        for name, value in args.items():
            cmd += ["-p", f"{name}:={value}"]
        node = ros.python(cmd, name="node")
        rig = Rig(ros)
        assert rig.client.wait_for_service(timeout_sec=60), f"no ~/ask service:\n{node.output()}"
        assert wait_for(lambda: rig.camera.get_subscription_count() > 0, 30), f"not subscribed:\n{node.output()}"
        rig.process = node
        yield rig
        assert node.alive(), f"the node died:\n{node.output()}"


def test_no_frame_yet(rig):
    response = rig.ask()
    assert not response.success
    assert "no camera frame received yet" in response.error


def test_round_trip_on_published_frames(rig):
    assert wait_for(lambda: rig.ros.node.count_publishers("/surgery_r1/annotated_image") > 0, 10)
    for i, stamp in enumerate((100.0, 100.033, 100.066)):
        rig.publish(stamp, width=1280, height=1024, frame_id="/camera_left" if i else "camera_left")
    response = rig.ask_when_ready(100.066, question="Where is suction located?", reasoning=True)
    assert response.success, response.error
    newest = rig.ask(reasoning=True)  # stamp zero: the newest frame
    assert newest.success and stamp_of(newest.image_header) == pytest.approx(100.066)
    assert newest.image_header.frame_id == "camera_left"  # gscam's leading '/' removed
    assert newest.answer == "left-top"
    box = newest.box
    assert (box.x_offset, box.y_offset, box.width, box.height) == (0, 0, 640, 512)
    assert "size 1280x1024" in newest.reasoning and "mean RGB 200.0,100.0,50.0" in newest.reasoning
    assert newest.coherent
    assert newest.latency_ms >= newest.inference_ms > 0
    assert 0 <= newest.frame_age_ms < 5000
    # every answer is published, with the answered frame's header
    assert wait_for(lambda: any(a.question == "Where is suction located?" for a in rig.answers), 5)
    published = rig.answers[-1]
    assert stamp_of(published.header) == pytest.approx(100.066) and published.answer == "left-top"
    assert (published.box.width, published.box.height) == (640, 512)
    # and drawn on the answered frame
    assert wait_for(lambda: len(rig.annotated) >= 1, 5), "no annotated image"
    img = rig.annotated[-1]
    assert (img.width, img.height, img.encoding) == (1280, 1024, "rgb8")
    assert stamp_of(img.header) == pytest.approx(100.066)
    pixels = np.frombuffer(img.data, np.uint8).reshape(1024, 1280, 3)
    assert tuple(pixels[256, 640]) == (0, 255, 0)  # right edge of the box


def test_frame_choice_by_stamp(rig):
    exact = rig.ask(stamp_s=100.033)
    assert exact.success and stamp_of(exact.image_header) == pytest.approx(100.033)
    near = rig.ask(stamp_s=100.033 + TOLERANCE_S / 2)  # within the tolerance: the nearest frame
    assert near.success and stamp_of(near.image_header) == pytest.approx(100.033)
    far = rig.ask(stamp_s=100.5)
    assert not far.success
    assert f"no buffered frame within {TOLERANCE_S:g} s" in far.error and "100.066" in far.error


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8", "rgba8", "bgra8"])
def test_accepted_encodings(rig, encoding):
    stamp = 200 + ["rgb8", "bgr8", "mono8", "rgba8", "bgra8"].index(encoding)
    rig.publish(stamp, encoding)
    response = rig.ask_when_ready(stamp, reasoning=True)
    assert response.success, response.error
    expected = "200.0,200.0,200.0" if encoding == "mono8" else "200.0,100.0,50.0"
    assert f"size 64x48 mean RGB {expected}" in response.reasoning


def test_row_padding(rig):
    rgb = np.full((48, 64, 3), COLOUR, np.uint8)
    step = 64 * 3 + 8
    padded = np.zeros((48, step), np.uint8)
    padded[:, : 64 * 3] = rgb.reshape(48, -1)
    rig.publish(210.0, "rgb8", data=padded.tobytes(), step=step)
    response = rig.ask_when_ready(210.0, reasoning=True)
    assert response.success and "size 64x48 mean RGB 200.0,100.0,50.0" in response.reasoning


def test_bad_frames_are_counted_and_skipped(rig):
    before = rig.latest_diagnostics()
    rig.publish(300.0, "mono16", data=bytes(64 * 48 * 2), step=128)
    rig.publish(300.1, "bayer_rggb8", data=bytes(64 * 48), step=64)
    rig.publish(300.2, "16UC1", data=bytes(64 * 48 * 2), step=128)
    rig.publish(300.3, "rgb8", data=bytes(64 * 48 * 3 - 5), step=64 * 3)  # data shorter than height*step
    rig.publish(300.4, "rgb8")  # a good one after them
    good = rig.ask_when_ready(300.4)
    assert good.success, good.error
    for stamp in (300.0, 300.1, 300.2, 300.3):
        response = rig.ask(stamp_s=stamp)
        assert not response.success and "no buffered frame" in response.error
    rig.diagnostics.clear()

    def counted() -> bool:
        d = rig.latest_diagnostics()
        return (
            int(d.get("frames_skipped_encoding", 0)) - int(before.get("frames_skipped_encoding", 0)) == 3
            and int(d.get("frames_skipped_malformed", 0)) - int(before.get("frames_skipped_malformed", 0)) == 1
        )

    assert wait_for(counted, 10), rig.latest_diagnostics()
    d = rig.latest_diagnostics()
    assert "size" in d["last_frame_error"] or "bytes" in d["last_frame_error"]
    assert rig.process.alive()


def test_tiny_newest_frame_does_not_wedge_the_node(rig):
    """Measured once: a well-formed 1x1 frame became the newest and every question was refused after it."""
    before = rig.latest_diagnostics()
    rig.publish(350.0)
    assert rig.ask_when_ready(350.0).success
    rig.publish(350.1, width=1, height=1)
    rig.publish(350.2, width=16, height=16)
    rig.diagnostics.clear()
    key = "frames_skipped_too_small"
    assert wait_for(lambda: int(rig.latest_diagnostics().get(key, 0)) - int(before.get(key, 0)) == 2, 10)
    newest = rig.ask(reasoning=True)  # stamp 0: the newest frame the engine can use
    assert newest.success, newest.error
    assert stamp_of(newest.image_header) == pytest.approx(350.0) and "size 64x48" in newest.reasoning
    assert "too small" in rig.latest_diagnostics()["last_frame_error"]


def test_bad_questions(rig):
    rig.publish(400.0)
    assert rig.ask_when_ready(400.0).success
    for question, expected in (("", "empty"), ("   ", "empty"), ("x" * 501, "the limit is 500")):
        response = rig.ask(question, stamp_s=400.0)
        assert not response.success and expected in response.error, response.error


def test_engine_exception_then_recovery(rig):
    rig.publish(500.0)
    assert rig.ask_when_ready(500.0).success
    failed = rig.ask("Please explode", stamp_s=500.0)
    assert not failed.success
    assert "engine failure" in failed.error and "injected fault" in failed.error
    again = rig.ask(stamp_s=500.0)
    assert again.success, again.error


def test_engine_process_killed_then_started_again(rig):
    """The model runs in its own process (engine_process:=true): killed, the next question starts it again."""
    rig.publish(550.0)
    assert rig.ask_when_ready(550.0).success
    engine_pid = int(rig.latest_diagnostics()["engine_pid"])
    assert engine_pid != rig.process.pid
    os.kill(engine_pid, signal.SIGKILL)
    rig.diagnostics.clear()
    assert wait_for(lambda: rig.latest_diagnostics()["engine_pid"] == "None", 10)  # the node saw it die (idle)
    rig.publish(551.0)
    again = rig.ask_when_ready(551.0)
    assert again.success, again.error
    rig.diagnostics.clear()
    assert wait_for(lambda: rig.latest_diagnostics()["engine_pid"] not in (str(engine_pid), "None"), 10)
    assert rig.process.alive()


def test_stale_frame_is_refused(rig):
    rig.publish(600.0)
    assert rig.ask_when_ready(600.0).success
    time.sleep(MAX_FRAME_AGE_S + 0.3)
    response = rig.ask()
    assert not response.success and "max_frame_age_s" in response.error
    # WARN once the stream stalls (the next status after the frame passed max_frame_age_s; one per second)
    assert wait_for(lambda: rig.latest_diagnostics()["_level"] != 0, 5), rig.latest_diagnostics()
    assert float(rig.latest_diagnostics()["frame_age_s"]) > MAX_FRAME_AGE_S


def test_concurrent_clients_while_frames_stream(rig, capsys):
    """4 clients x 25 questions while 1280x1024 frames stream at 30 Hz: all answered or refused as busy."""
    from surgery_r1_interfaces.srv import AskQuestion

    camera = rig.ros.python(
        ["tests/fake_camera.py", "--topic", TOPIC, "--width", "1280", "--height", "1024", "--rate", "30"],
        name="camera",
    )
    try:
        assert camera.wait_output("publishing", 30), camera.output()
        assert wait_for(lambda: rig.ask().success, 15), "the stream did not reach the node"
        rig.diagnostics.clear()
        before = int(rig.latest_diagnostics()["frames_received"])
        sent_before = camera_sent(camera)
        clients = [rig.ros.node.create_client(AskQuestion, "/surgery_r1/ask") for _ in range(4)]
        for client in clients:
            assert client.wait_for_service(timeout_sec=10)
        results: list[list] = [[] for _ in clients]

        def run(i: int) -> None:
            for k in range(25):
                results[i].append(rig.ask(f"Where is suction located? ({i}/{k})", client=clients[i], timeout=30))

        start = time.monotonic()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - start
        responses = [r for rs in results for r in rs]
        assert len(responses) == 100
        answered = [r for r in responses if r.success]
        refused = [r for r in responses if not r.success]
        for r in refused:
            assert "busy" in r.error and "max_queue" in r.error, r.error
        assert len(answered) >= 25, f"only {len(answered)} of 100 answered"
        # intake kept up: every answered frame was fresh when asked about
        ages = [r.frame_age_ms for r in answered]
        assert max(ages) < 1000, f"stale frames answered: max age {max(ages):.0f} ms"
        assert rig.process.alive()
        # frames kept arriving during the storm: the node received most of what the camera sent. The camera
        # reports its count once a second and a storm can end within one: count after its next report.
        time.sleep(1.5)
        sent = camera_sent(camera) - sent_before
        rig.diagnostics.clear()
        d = rig.latest_diagnostics()
        received = int(d["frames_received"]) - before
        assert sent > 0 and received >= 0.5 * sent, f"the node received {received} of {sent} frames"
        assert float(d["input_frame_rate_hz"]) > 10, d
        latencies = [r.latency_ms for r in answered]
        with capsys.disabled():
            print(
                f"\n  concurrency: {len(answered)} answered, {len(refused)} refused (busy) in {elapsed:.1f} s; "
                f"node latency p50 {statistics.median(latencies):.1f} ms; max frame age {max(ages):.0f} ms; "
                f"{received} of ~{sent} frames received ({d['input_frame_rate_hz']} Hz)",
                file=sys.stderr,
            )
    finally:
        camera.stop()
