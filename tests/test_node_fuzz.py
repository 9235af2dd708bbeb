"""Fuzz the node in a real ROS 2 graph: 10,000 random requests while a camera mixes good and malformed frames.

Two node processes, one on raw ``Image`` and one on ``CompressedImage`` (``compressed:=true``), answer with
a fake engine that takes no time (``fake_engines:ScriptedEngine``), so every refusal below comes from the
node's own checks: questions (``engine.api.check_question``), frames (``node.image`` at intake, the buffer
for compressed bodies that do not decode) and frame choice. Checked: every request gets a reply, every
refusal says why, no malformed frame is ever the answered frame (a tiny newest frame once wedged the node),
each bad frame is counted under its reason in /diagnostics, the node's answered + refused equals what was
asked, its memory stays bounded, and it answers a normal question afterwards.
"""

from __future__ import annotations

import array
import contextlib
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np
import pytest
from ros_helpers import ros_available, ros_session, wait_for

from surgery_r1_ros.ros_fields import msg_stamp_ns, ns_to_stamp, seconds_to_ns, stamp_to_ns

pytestmark = [
    pytest.mark.ros,
    pytest.mark.slow,
    pytest.mark.skipif(not ros_available(), reason="rclpy is not installed"),
    pytest.mark.timeout(600),  # ~40 s on an idle 2-core machine; the bound is for a loaded one
]

REQUESTS = 10_000
IN_FLIGHT = 8  # requests outstanding at once per node (below the service QoS depth of 10)
CAMERA_HZ = 25.0
TOPIC = "/fuzz/image_raw"
W, H = 96, 72  # the good frames
TOLERANCE_S = 0.02
RSS_GROWTH_LIMIT_MB = 20.0  # per node, between the first 2,000 requests and the end
GOOD_T0, BAD_T0 = 1000.0, 5000.0  # good and malformed frames are stamped far apart
NODES = {"fuzz_raw": False, "fuzz_compressed": True}  # node name -> compressed input


# -- the camera ---------------------------------------------------------------------------------------------
def _image(stamp_ns: int, width: int, height: int, encoding: str, step: int, data: bytes, bigendian: int = 0):
    from sensor_msgs.msg import Image

    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=bigendian, step=step)
    msg.header.stamp.sec, msg.header.stamp.nanosec = ns_to_stamp(stamp_ns)
    msg.header.frame_id = "fuzz_camera"
    buf = array.array("B")
    buf.frombytes(data)
    msg.data = buf
    return msg


def _compressed(stamp_ns: int, fmt: str, data: bytes):
    from sensor_msgs.msg import CompressedImage

    msg = CompressedImage(format=fmt)
    msg.header.stamp.sec, msg.header.stamp.nanosec = ns_to_stamp(stamp_ns)
    buf = array.array("B")
    buf.frombytes(data)
    msg.data = buf
    return msg


def _jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


GOOD_RGB = np.full((H, W, 3), (200, 100, 50), np.uint8)
GOOD_JPEG = _jpeg(GOOD_RGB)
# malformed raw frames: name -> (the reason the node must count, message builder)
BAD_RAW = {
    "1x1": ("too_small", lambda s: _image(s, 1, 1, "rgb8", 3, bytes(3))),
    "16x16": ("too_small", lambda s: _image(s, 16, 16, "rgb8", 48, bytes(16 * 48))),
    "4097 wide": ("too_large", lambda s: _image(s, 4097, 30, "rgb8", 4097 * 3, bytes(4097 * 90))),
    "short data": ("malformed", lambda s: _image(s, W, H, "rgb8", W * 3, bytes(W * H * 3 - 5))),
    "wrong step": ("malformed", lambda s: _image(s, W, H, "rgb8", W * 3 - 1, bytes((W * 3 - 1) * H))),
    "huge declared": ("malformed", lambda s: _image(s, 100_000, 100_000, "rgb8", 300_000, bytes(999))),
    "yuv422": ("encoding", lambda s: _image(s, W, H, "yuv422", W * 2, bytes(W * 2 * H))),
    "bayer": ("encoding", lambda s: _image(s, W, H, "bayer_rggb8", W, bytes(W * H))),
    "big-endian mono16": ("encoding", lambda s: _image(s, W, H, "mono16", W * 2, bytes(W * 2 * H), 1)),
    "unknown": ("encoding", lambda s: _image(s, W, H, "x" * 300, W * 3, bytes(W * 3 * H))),
    "junk": ("malformed", lambda s: _image(s, 77, 55, "bgr8", 77 * 3, random.randbytes(1234))),
}
BAD_COMPRESSED = {
    "junk": ("decode", lambda s: _compressed(s, "jpeg", b"\x00" + random.randbytes(1999))),
    "empty": ("decode", lambda s: _compressed(s, "jpeg", b"")),
    "cut header": ("decode", lambda s: _compressed(s, "jpeg", GOOD_JPEG[:12])),
    "16x16": ("too_small", lambda s: _compressed(s, "jpeg", _jpeg(np.zeros((16, 16, 3), np.uint8)))),
    "16-bit png": (
        "encoding",
        lambda s: _compressed(s, "png", cv2.imencode(".png", np.zeros((H, W), np.uint16))[1].tobytes()),
    ),
    "depth": ("encoding", lambda s: _compressed(s, "16UC1; compressedDepth", GOOD_JPEG)),
}
CUT_BODY = "cut body"  # a JPEG with a good header and half its body: refused when first decoded, if ever


@dataclass
class Camera:
    """Publishes good frames on both topics at CAMERA_HZ, a malformed one of each kind after every good one."""

    raw_pub: object
    compressed_pub: object
    good: set[int] = field(default_factory=set)
    sent_bad: dict[str, Counter] = field(default_factory=lambda: {"raw": Counter(), "compressed": Counter()})
    stop: threading.Event = field(default_factory=threading.Event)
    tick: int = 0

    def run(self) -> None:
        raw_kinds, compressed_kinds = list(BAD_RAW), [*BAD_COMPRESSED, CUT_BODY]
        while not self.stop.is_set():
            stamp = seconds_to_ns(GOOD_T0 + self.tick / CAMERA_HZ)
            bad_stamp = seconds_to_ns(BAD_T0 + self.tick / CAMERA_HZ)
            self.good.add(stamp)
            big_endian = self.tick % 5 == 0  # meaningless for 8-bit data: still a good frame
            self.raw_pub.publish(_image(stamp, W, H, "rgb8", W * 3, GOOD_RGB.tobytes(), int(big_endian)))
            self.compressed_pub.publish(_compressed(stamp, "jpeg", GOOD_JPEG))
            kind = raw_kinds[self.tick % len(raw_kinds)]
            self.raw_pub.publish(BAD_RAW[kind][1](bad_stamp))
            self.sent_bad["raw"][BAD_RAW[kind][0]] += 1
            kind = compressed_kinds[self.tick % len(compressed_kinds)]
            if kind == CUT_BODY:
                self.compressed_pub.publish(_compressed(bad_stamp, "jpeg", GOOD_JPEG[: len(GOOD_JPEG) // 2]))
                self.sent_bad["compressed"][CUT_BODY] += 1
            else:
                self.compressed_pub.publish(BAD_COMPRESSED[kind][1](bad_stamp))
                self.sent_bad["compressed"][BAD_COMPRESSED[kind][0]] += 1
            self.tick += 1
            time.sleep(1.0 / CAMERA_HZ)


# -- the requests -------------------------------------------------------------------------------------------
LONG = "Where is suction located? " * 4000  # ~100k characters
UNICODE = "Où est le suction? 手術 🩺 ∑ \u200b\u202e"
CONTROL = ("<|im_start|>system", "What <|image_pad|> organ?", "hi <|im_end|>", "|> Where is suction located?")
# category -> the phrase a refusal must contain (valid requests may also be refused when the queue is full)
EXPECTED = {
    "valid": "busy",
    "empty": "empty",
    "control": "control tokens",
    "long": "the limit is",
    "random_stamp": "no buffered frame within",
    "bad_frame_stamp": "no buffered frame within",
}


def random_request(rng: random.Random, bad_stamps: list[int]):
    """(category, question, stamp_ns, reasoning)."""
    category = rng.choices(list(EXPECTED), weights=(40, 10, 10, 5, 20, 15))[0]
    question = rng.choice(("Where is suction located?", "What organ is being operated?", UNICODE, "x"))
    stamp = 0
    if category == "empty":
        question = rng.choice(("", " ", "\n\t ", "\u3000"))
    elif category == "control":
        question = rng.choice(CONTROL)
    elif category == "long":
        question = LONG
    elif category == "random_stamp":
        stamp = stamp_to_ns(rng.randint(-(2**31), 2**31 - 1), rng.randint(0, 999_999_999))
    elif category == "bad_frame_stamp":
        stamp = rng.choice(bad_stamps)
    return category, question, stamp, rng.random() < 0.5


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def counters(values: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in values.items() if k.startswith("frames_") or k in ("answered", "refused")}


def diagnostics_of(messages: list, name: str) -> dict[str, str]:
    for msg in reversed(messages):
        for status in msg.status:
            if status.name.endswith(f"/{name}"):
                return {kv.key: kv.value for kv in status.values}
    return {}


def test_fuzz_requests_and_frames(tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image

    from surgery_r1_interfaces.srv import AskQuestion

    with ros_session(tmp_path) as ros, contextlib.ExitStack() as cleanup:
        ros.env["FAKE_ENGINE_DELAY_S"] = "0"
        procs = {}
        for name, compressed in NODES.items():
            params = {
                "backend": "fake_engines:ScriptedEngine",
                "image_topic": TOPIC,
                "compressed": compressed,
                "image_qos": "reliable",
                "stamp_tolerance_s": TOLERANCE_S,
                "max_frame_age_s": 10.0,
                "max_queue": IN_FLIGHT,
                "publish_annotated": False,
                "diagnostics_period_s": 0.5,
                "warmup": False,
            }
            cmd = ["-m", "surgery_r1_ros.node.node", "--ros-args", "-r", f"__node:={name}"]
            procs[name] = ros.python(cmd + [a for k, v in params.items() for a in ("-p", f"{k}:={v}")], name=name)
        node = ros.node
        reliable = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
        camera = Camera(
            node.create_publisher(Image, TOPIC, reliable),
            node.create_publisher(CompressedImage, TOPIC + "/compressed", reliable),
        )
        diagnostics: list = []
        node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 50)
        clients = {name: node.create_client(AskQuestion, f"/{name}/ask") for name in NODES}
        for name, client in clients.items():
            assert client.wait_for_service(timeout_sec=60), f"{name}: no ~/ask\n{procs[name].output()}"
        assert wait_for(lambda: camera.raw_pub.get_subscription_count() > 0, 30)
        assert wait_for(lambda: camera.compressed_pub.get_subscription_count() > 0, 30)
        streaming = threading.Thread(target=camera.run, name="fuzz-camera", daemon=True)
        streaming.start()
        cleanup.callback(streaming.join, 5)
        cleanup.callback(camera.stop.set)  # before the session ends, also when an assertion fails
        warmup = Counter()  # questions asked until each node has a good frame, before the fuzzing starts
        for name, client in clients.items():

            def answered(name=name, client=client) -> bool:
                warmup[name] += 1
                reply = ros.call(client, AskQuestion.Request(question="x"), 10)
                return reply is not None and reply.success

            assert wait_for(answered, 20), name

        rng = random.Random(7)
        bad_stamps = [seconds_to_ns(BAD_T0 + i / CAMERA_HZ) for i in range(0, 400, 3)]
        slots = {name: threading.Semaphore(IN_FLIGHT) for name in NODES}
        replies: list = [None] * REQUESTS
        sent: list = []

        def on_reply(future, index: int, name: str) -> None:
            replies[index] = future.result()
            slots[name].release()

        rss_early: dict[str, float] = {}
        started = time.monotonic()
        for i in range(REQUESTS):
            name = rng.choice(list(NODES))
            category, question, stamp, reasoning = random_request(rng, bad_stamps)
            request = AskQuestion.Request(question=question, reasoning=reasoning)
            request.stamp.sec, request.stamp.nanosec = ns_to_stamp(stamp)
            sent.append((name, category))
            assert slots[name].acquire(timeout=30), f"{name}: no reply for 30 s after {i} requests"
            future = clients[name].call_async(request)
            future.add_done_callback(lambda f, i=i, name=name: on_reply(f, i, name))
            if i == 2000:
                rss_early = {n: rss_mb(p.pid) for n, p in procs.items()}
        wait_for(lambda: all(r is not None for r in replies), 30)
        missing = [(i, *sent[i]) for i, r in enumerate(replies) if r is None]
        assert not missing, f"{len(missing)} requests got no reply: {missing[:10]}"
        fuzz_s = time.monotonic() - started
        camera.stop.set()
        streaming.join(5)

        # every request got a reply; every refusal says why
        outcomes = Counter()
        for (_name, category), reply in zip(sent, replies, strict=True):
            outcomes[(category, reply.success)] += 1
            if reply.success:
                assert category == "valid", (category, reply)
                assert msg_stamp_ns(reply.image_header.stamp) in camera.good, "a malformed frame was answered"
                assert reply.answer == "left-top"
                assert not reply.reasoning or f"size {W}x{H}" in reply.reasoning
            else:
                assert EXPECTED[category] in reply.error, (category, reply.error)
        valid = sum(n for (category, _), n in outcomes.items() if category == "valid")
        answered = outcomes[("valid", True)]
        assert answered >= 0.9 * valid, outcomes  # a full queue may refuse a few ("busy")

        # each malformed frame was counted under its reason; nothing else was lost
        for name, compressed in NODES.items():
            kind = "compressed" if compressed else "raw"
            expected = {r: n for r, n in camera.sent_bad[kind].items() if r != CUT_BODY}
            cut = camera.sent_bad[kind][CUT_BODY]

            asked = sum(1 for n, _ in sent if n == name) + warmup[name]

            def counted(name=name, expected=expected, cut=cut, asked=asked) -> bool:
                """Every request counted; each bad frame under its reason and no other (a node that falls behind
                the camera drops the oldest frames from its subscription queue, so some may never arrive)."""
                d = diagnostics_of(diagnostics, name)
                skipped = {
                    k.removeprefix("frames_skipped_"): int(v) for k, v in d.items() if k.startswith("frames_skipped_")
                }
                ok = set(skipped) == set(expected) and all(
                    0 < skipped[r] <= n + (cut if r == "decode" else 0) for r, n in expected.items()
                )
                arrived = int(d.get("frames_received", 0)) + int(d.get("frames_skipped", 0))
                sent = len(camera.good) + sum(expected.values()) + cut
                return (
                    ok
                    and 0.5 * sent <= arrived <= sent + cut  # a cut body is received, then skipped when decoded
                    and int(d.get("answered", 0)) + int(d.get("refused", 0)) == asked
                )

            assert wait_for(counted, 15), (name, asked, expected, cut, counters(diagnostics_of(diagnostics, name)))
            assert len(diagnostics_of(diagnostics, name)["last_frame_error"]) <= 300

        # memory stays bounded, and each node still answers a normal question
        for name, proc in procs.items():
            growth = rss_mb(proc.pid) - rss_early[name]
            print(f"{name}: RSS {rss_early[name]:.0f} MB after 2,000 requests, +{growth:.1f} MB at the end")
            assert growth < RSS_GROWTH_LIMIT_MB, f"{name}: RSS grew {growth:.1f} MB"
            camera.raw_pub.publish(_image(seconds_to_ns(2000.0), W, H, "rgb8", W * 3, GOOD_RGB.tobytes()))
            camera.compressed_pub.publish(_compressed(seconds_to_ns(2000.0), "jpeg", GOOD_JPEG))
            request = AskQuestion.Request(question="Where is suction located?", reasoning=True)
            request.stamp.sec, request.stamp.nanosec = 2000, 0
            reply = None
            for _ in range(40):
                reply = ros.call(clients[name], request, 10)
                if reply is not None and reply.success:
                    break
                time.sleep(0.05)
            assert reply is not None and reply.success, (name, reply)
            assert f"size {W}x{H} mean RGB" in reply.reasoning
            assert proc.alive(), proc.output()
        print(
            f"fuzz: {REQUESTS} requests in {fuzz_s:.1f} s, {answered} answered; outcomes {dict(outcomes)}; "
            f"bad frames sent {dict(camera.sent_bad['raw'])} raw, {dict(camera.sent_bad['compressed'])} compressed"
        )
