"""The node's ROS-free parts: image conversion, frame buffer, worker queue, diagnostics, drawing, loading."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from surgery_r1_ros.engine.api import Cancelled, EngineProtocol, GroundedAnswer, InputError, Progress
from surgery_r1_ros.node.annotate import draw_answer
from surgery_r1_ros.node.buffer import Frame, FrameBuffer, FrameSelectionError
from surgery_r1_ros.node.diagnostics import OK, WARN, NodeStats
from surgery_r1_ros.node.engine_loader import EngineLoadError, load_engine
from surgery_r1_ros.node.image import (
    ImageError,
    check_compressed,
    check_image,
    clean_frame_id,
    compressed_to_rgb,
    image_to_rgb,
    rgb_to_image_fields,
)
from surgery_r1_ros.node.params import DEFAULT_IMAGE_TOPIC, DEFAULTS, PARAMETERS
from surgery_r1_ros.node.worker import InferenceWorker, Job, QueueFull
from surgery_r1_ros.ros_fields import seconds_to_ns


def rgb_image(h: int = 6, w: int = 5) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- image conversion -----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_to_rgb(encoding):
    rgb = rgb_image()
    src = {
        "rgb8": rgb,
        "bgr8": rgb[:, :, ::-1],
        "rgba8": np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]),
        "bgra8": np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 7, np.uint8)]),
    }[encoding]
    h, w, c = src.shape
    out = image_to_rgb(h, w, encoding, w * c, np.ascontiguousarray(src).tobytes())
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


def test_mono8_to_rgb():
    gray = rgb_image()[:, :, 0].copy()
    out = image_to_rgb(6, 5, "mono8", 5, gray.tobytes())
    np.testing.assert_array_equal(out, np.dstack([gray] * 3))


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8"])
def test_row_padding_is_dropped(encoding):
    rgb = rgb_image()
    channels = 1 if encoding == "mono8" else 3
    src = rgb[:, :, :channels] if encoding != "bgr8" else rgb[:, :, ::-1]
    step = 5 * channels + 3  # 3 bytes of padding per row
    padded = np.zeros((6, step), np.uint8)
    padded[:, : 5 * channels] = np.ascontiguousarray(src).reshape(6, -1)
    out = image_to_rgb(6, 5, encoding, step, padded.tobytes())
    expected = np.dstack([rgb[:, :, 0]] * 3) if encoding == "mono8" else rgb
    np.testing.assert_array_equal(out, expected)


def test_rgb8_is_a_view_not_a_copy():
    rgb = rgb_image(1024, 1280)
    data = rgb.tobytes()
    out = image_to_rgb(1024, 1280, "rgb8", 1280 * 3, data)
    assert np.shares_memory(out, np.frombuffer(data, np.uint8))


@pytest.mark.parametrize(
    ("encoding", "step", "size", "reason"),
    [
        ("mono16", 10, 60, "encoding"),
        ("16UC1", 10, 60, "encoding"),
        ("bayer_rggb8", 5, 30, "encoding"),
        ("yuv422", 10, 60, "encoding"),
        ("rgb8", 15, 89, "malformed"),  # one byte short
        ("rgb8", 15, 91, "malformed"),  # one byte too many
        ("rgb8", 14, 84, "malformed"),  # step shorter than a row
    ],
)
def test_bad_images_are_refused_with_a_reason(encoding, step, size, reason):
    with pytest.raises(ImageError) as err:
        image_to_rgb(6, 5, encoding, step, bytes(size))
    assert err.value.reason == reason
    assert str(err.value)


@pytest.mark.parametrize(
    ("width", "height", "reason"),
    [(1, 1, "too_small"), (16, 16, "too_small"), (640, 27, "too_small"), (4097, 30, "too_large")],
)
def test_intake_refuses_frames_the_engine_cannot_use(width, height, reason):
    """Well-formed frames outside the engine's sides are refused at intake (a 1x1 frame once wedged the node)."""
    image_to_rgb(height, width, "rgb8", width * 3, bytes(width * height * 3))  # well formed: converts
    with pytest.raises(ImageError) as err:
        check_image(height, width, "rgb8", width * 3, width * height * 3)
    assert err.value.reason == reason and f"{width}x{height}" in str(err.value)
    assert check_image(28, 4096, "bgr8", 4096 * 3, 28 * 4096 * 3) == 3  # the limits themselves are fine


def test_compressed_intake_reads_only_the_header():
    rgb = np.zeros((64, 96, 3), np.uint8)
    for ext in (".jpg", ".png"):
        data = cv2.imencode(ext, rgb)[1].tobytes()
        assert check_compressed(ext[1:], data) == (96, 64)
        with pytest.raises(ImageError) as err:
            check_compressed(ext[1:], data[:12])  # cut inside the header
        assert err.value.reason == "decode"
    cases = [
        ("jpeg", b"", "decode"),
        ("jpeg", b"\x00junk bytes, not an image at all", "decode"),
        ("png", cv2.imencode(".png", np.zeros((32, 32), np.uint16))[1].tobytes(), "encoding"),
        ("jpeg", cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes(), "too_small"),
        ("rgb8; compressedDepth png", cv2.imencode(".png", rgb)[1].tobytes(), "encoding"),
    ]
    for fmt, data, reason in cases:
        with pytest.raises(ImageError) as err:
            check_compressed(fmt, data)
        assert err.value.reason == reason, (fmt, str(err.value))


def test_compressed_jpeg_and_png():
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0] = 200  # red
    for ext in (".jpg", ".png"):
        ok, enc = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert ok
        out = compressed_to_rgb(ext[1:], enc.tobytes())
        assert out.shape == (32, 48, 3)
        assert abs(int(out[..., 0].mean()) - 200) <= 3 and out[..., 2].mean() < 5
    with pytest.raises(ImageError):
        compressed_to_rgb("jpeg", b"not a jpeg")
    with pytest.raises(ImageError):
        compressed_to_rgb("jpeg", b"")


def test_publish_fields_round_trip():
    rgb = rgb_image()
    h, w, enc, step, data = rgb_to_image_fields(rgb)
    assert (h, w, enc, step) == (6, 5, "rgb8", 15)
    np.testing.assert_array_equal(image_to_rgb(h, w, enc, step, data), rgb)


def test_frame_id_leading_slash():
    assert clean_frame_id("/camera_left") == "camera_left"
    assert clean_frame_id("camera") == "camera"


# --- frame buffer ---------------------------------------------------------------------------------------


def make_frame(stamp_s: float, received: float, convert=lambda: np.zeros((4, 4, 3), np.uint8)) -> Frame:
    return Frame(seconds_to_ns(stamp_s), "cam", received, 4, 4, convert, checked=False)


def test_buffer_newest_nearest_and_errors():
    buf = FrameBuffer(3)
    with pytest.raises(FrameSelectionError) as err:
        buf.select(0, 0.05, 2.0)
    assert err.value.reason == "no_frame"
    now = 100.0
    for i in range(5):
        buf.push(make_frame(10 + i * 0.1, now))
    assert len(buf) == 3  # oldest two dropped
    assert buf.select(0, 0.05, 2.0, now).stamp_ns == seconds_to_ns(10.4)
    assert buf.select(seconds_to_ns(10.31), 0.05, 2.0, now).stamp_ns == seconds_to_ns(10.3)
    with pytest.raises(FrameSelectionError) as err:
        buf.select(seconds_to_ns(10.0), 0.05, 2.0, now)  # dropped from the buffer
    assert err.value.reason == "no_match" and "10.200000000" in str(err.value)
    with pytest.raises(FrameSelectionError) as err:
        buf.select(0, 0.05, 2.0, now + 2.5)
    assert err.value.reason == "stale" and "max_frame_age_s" in str(err.value)


def test_buffer_drops_frames_that_do_not_decode():
    """A compressed frame whose body does not decode is never the answered frame: the next best one is."""
    dropped = []
    buf = FrameBuffer(4, on_unusable=lambda reason, message: dropped.append((reason, message)))

    def broken():
        raise ImageError("decode", "could not decode the jpeg image (10 bytes)")

    now = 100.0
    buf.push(make_frame(10.0, now))
    buf.push(make_frame(10.1, now, broken))  # the newest, and the nearest to 10.09
    assert buf.select(0, 0.05, 2.0, now).stamp_ns == seconds_to_ns(10.0)
    assert dropped == [("decode", "could not decode the jpeg image (10 bytes)")] and len(buf) == 1
    buf.push(make_frame(10.2, now, broken))
    with pytest.raises(FrameSelectionError) as err:
        buf.select(seconds_to_ns(10.19), 0.05, 2.0, now)  # no good frame within the tolerance
    assert err.value.reason == "no_match" and len(dropped) == 2
    assert buf.select(seconds_to_ns(10.02), 0.05, 2.0, now).stamp_ns == seconds_to_ns(10.0)


def test_frame_converts_once_across_threads():
    calls = []

    def convert():
        calls.append(1)
        time.sleep(0.01)
        return np.zeros((2, 2, 3), np.uint8)

    frame = Frame(1, "c", 0.0, 2, 2, convert)
    threads = [threading.Thread(target=frame.rgb) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


# --- worker ---------------------------------------------------------------------------------------------


class SlowEngine:
    """Answers with the question itself; streams ``tokens`` tokens with the cancel check before each step."""

    def __init__(self, delay: float = 0.05, fail_on: str = "explode", tokens: int = 1, encode_ms: float = 0.0) -> None:
        self.delay, self.fail_on, self.tokens, self.encode_ms = delay, fail_on, tokens, encode_ms
        self.encoded: list = []
        self.asks: list[tuple] = []  # (question, stamp, image given)
        self.gate = threading.Event()
        self.gate.set()

    def encode(self, image, stamp=None):
        self.encoded.append(stamp)
        return stamp

    def ask(self, question, image=None, stamp=None, reasoning=False, max_new_tokens=None, *, on_token=None,
            cancelled=None) -> GroundedAnswer:  # fmt: skip
        self.asks.append((question, stamp, image is not None))
        self.gate.wait(5)
        time.sleep(self.delay)
        if self.fail_on in question:
            raise RuntimeError("boom")
        if question == "bad":
            raise InputError("bad input")
        for n in range(1, self.tokens + 1):
            if n > 1 and cancelled is not None and cancelled():
                raise Cancelled(Progress("<think>" + "x" * (n - 1), n - 1))
            if on_token is not None:
                on_token(Progress("<think>" + "x" * n, n))
            time.sleep(0.005)
        return GroundedAnswer(question, None, None, False, 1.0, stamp=stamp, new_tokens=self.tokens,
                              encode_ms=self.encode_ms)  # fmt: skip


def job(question: str, frame: Frame | None = None) -> Job:
    return Job(question, False, frame or make_frame(1.0, time.monotonic()), time.perf_counter())


def test_worker_answers_in_order_and_bounds_the_queue():
    engine = SlowEngine()
    engine.gate.clear()  # hold the first job so the queue fills
    worker = InferenceWorker(engine, 2, encode_ahead=False)
    worker.start()
    try:
        first, second = job("one"), job("two")
        worker.submit(first)
        worker.submit(second)
        with pytest.raises(QueueFull, match="busy"):
            worker.submit(job("three"))
        engine.gate.set()
        assert first.done.wait(5) and second.done.wait(5)
        assert first.answer.answer == "one" and not first.error
        assert worker.depth == 0
        worker.submit(job("four"))  # room again
    finally:
        worker.stop()


def test_worker_survives_engine_failures():
    worker = InferenceWorker(SlowEngine(0.0), 4, encode_ahead=False)
    worker.start()
    try:
        jobs = [job("explode now"), job("bad"), job("fine")]
        for j in jobs:
            worker.submit(j)
        assert all(j.done.wait(5) for j in jobs)
        assert jobs[0].error_kind == "engine" and "boom" in jobs[0].error
        assert jobs[1].error_kind == "engine_input" and "bad input" in jobs[1].error
        assert jobs[2].answer and not jobs[2].error
    finally:
        worker.stop()


def test_worker_encodes_the_newest_frame_while_idle():
    engine = SlowEngine(0.0)
    buf = FrameBuffer(4)
    worker = InferenceWorker(engine, 2, newest_frame=buf.newest, frame_interval_s=lambda: 0.033)
    worker.start()
    try:
        frame = make_frame(5.0, time.monotonic())
        buf.push(frame)
        worker.frame_arrived()
        assert wait(lambda: engine.encoded == [frame.seq])
        time.sleep(0.6)  # past the worker's idle wake-up: a frame is handed over once, not again and again
        assert engine.encoded == [frame.seq]
        # the engine owns what it holds: the question still carries the image, under the frame's stamp
        asked = job("where?", frame)
        worker.submit(asked)
        assert asked.done.wait(5) and not asked.error
        assert engine.asks == [("where?", frame.seq, True)]
    finally:
        worker.stop()


def test_worker_learns_the_encode_time_from_answers():
    """An ask that had to encode its frame reports how long that took; too slow for 30 Hz: no encode-ahead."""
    buf = FrameBuffer(4)
    worker = InferenceWorker(SlowEngine(0.0, encode_ms=500.0), 2, newest_frame=buf.newest,
                             frame_interval_s=lambda: 0.033)  # fmt: skip
    worker.start()
    try:
        first = job("one")
        worker.submit(first)
        assert first.done.wait(5) and worker.encode_ms == 500.0
        buf.push(make_frame(6.0, time.monotonic()))
        assert worker._frame_to_encode() is None
    finally:
        worker.stop()


def test_worker_streams_and_cancels_within_a_step():
    engine = SlowEngine(0.0, tokens=50)
    worker = InferenceWorker(engine, 3, encode_ahead=False)
    worker.start()
    try:
        seen: list[int] = []
        stop = threading.Event()
        running = job("stream")
        running.on_token = lambda p: (seen.append(p.new_tokens), len(seen) == 5 and stop.set())
        running.cancelled = stop.is_set
        worker.submit(running)
        assert running.done.wait(5)
        assert running.error_kind == "canceled" and running.answer is None
        assert seen == [1, 2, 3, 4, 5] and running.progress.new_tokens == 5  # not one token more
        assert running.progress.reasoning == "xxxxx"
        # a job cancelled while it waits never reaches the engine
        queued = job("never")
        queued.cancelled = lambda: True
        worker.submit(queued)
        assert queued.done.wait(5) and queued.error_kind == "canceled"
        assert [q for q, _, _ in engine.asks] == ["stream"]
        finished = job("whole")
        finished.on_token = lambda p: seen.append(p.new_tokens)
        worker.submit(finished)
        assert finished.done.wait(5) and finished.answer.new_tokens == 50 and seen[-1] == 50
    finally:
        worker.stop()


def test_progress_reasoning_grows_and_hides_a_half_written_closing_tag():
    texts = ["", "<thi", "<think>", "<think>The tip", "<think>The tip is left </th", "<think>The tip is left </think>",
             "<think>The tip is left </think><answer>left-top</answer>"]  # fmt: skip
    got = [Progress(t, i).reasoning for i, t in enumerate(texts)]
    assert got == ["", "", "", "The tip", "The tip is left", "The tip is left", "The tip is left"]


def test_worker_skips_encode_ahead_when_it_cannot_keep_up():
    buf = FrameBuffer(4)
    worker = InferenceWorker(SlowEngine(0.0), 2, newest_frame=buf.newest, frame_interval_s=lambda: 0.033)
    worker.encode_ms = 500.0  # slower than 30 Hz
    buf.push(make_frame(5.0, time.monotonic()))
    assert worker._frame_to_encode() is None
    worker.encode_ms = 5.0
    assert worker._frame_to_encode() is not None


def test_worker_stop_refuses_waiting_jobs():
    engine = SlowEngine()
    engine.gate.clear()
    worker = InferenceWorker(engine, 3, encode_ahead=False)
    worker.start()
    running, waiting = job("one"), job("two")
    worker.submit(running)
    time.sleep(0.05)
    worker.submit(waiting)
    engine.gate.set()
    worker.stop()
    assert waiting.done.is_set() and waiting.error_kind == "shutdown"
    with pytest.raises(QueueFull):
        worker.submit(job("late"))


def wait(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# --- diagnostics, drawing, parameters, loading -----------------------------------------------------------


def test_stats_rate_latency_and_levels():
    stats = NodeStats(rate_window_s=5.0)
    kw = dict(model="m", backend="b", device="cpu", max_frame_age_s=2.0, queue_depth=0)
    assert stats.status(state="active", now=0.0, **kw).level == WARN  # no frame yet
    for i in range(31):
        stats.frame(now=10 + i / 30)
    assert stats.frame_rate(now=11.0) == pytest.approx(30, rel=0.05)
    for ms in (10, 20, 30):
        stats.answer(ms, ms / 2)
    stats.bad_frame("encoding", "unsupported encoding 'mono16'")
    stats.refusal("busy", "busy")
    status = stats.status(state="active", now=11.0, **kw)
    assert status.level == OK
    v = status.values
    assert v["latency_p50_ms"] == "20.0" and v["latency_last_ms"] == "30.0"
    assert v["frames_skipped_encoding"] == "1" and v["requests_refused_busy"] == "1"
    assert "mono16" in v["last_frame_error"] and v["last_request_error"] == "busy"
    assert stats.status(state="active", now=20.0, **kw).level == WARN  # stream stalled
    assert stats.status(state="inactive", now=11.0, **kw).level == WARN


def test_draw_answer_marks_the_box():
    img = np.zeros((200, 300, 3), np.uint8)
    out = draw_answer(img, "Where is suction located?", "left-top", (20, 30, 120, 130))
    assert out.shape == img.shape
    assert tuple(out[80, 20]) == (0, 255, 0)  # left edge of the box in green
    assert img.sum() == 0  # the frame itself is untouched
    assert draw_answer(img, "q", "a", None).shape == img.shape


def test_parameter_table():
    names = [p.name for p in PARAMETERS]
    assert len(names) == len(set(names))
    assert DEFAULTS["image_topic"] == DEFAULT_IMAGE_TOPIC == "/jhu_daVinci/left/image_raw"
    assert DEFAULTS["image_qos"] == "sensor_data"
    assert all(p.description for p in PARAMETERS)


def test_engine_loader_errors_are_one_clear_line(tmp_path):
    with pytest.raises(EngineLoadError, match="not a folder"):
        load_engine(str(tmp_path / "missing"), "torch", "cpu")
    with pytest.raises(EngineLoadError, match="cannot import"):
        load_engine("", "no_such_module:Engine", "cpu")
    with pytest.raises(EngineLoadError, match="failed to start"):
        load_engine("", "fake_engines:BrokenEngine", "cpu")
    with pytest.raises(EngineLoadError, match="lacks encode"):
        load_engine("", "fake_engines:AskOnly", "cpu")
    with pytest.raises(EngineLoadError, match="unknown backend 'tensorrt-nonexistent'"):
        load_engine("", "tensorrt-nonexistent", "cpu")
    loaded = load_engine("", "fake_engines:ScriptedEngine", "auto")
    assert loaded.model == "built-in" and loaded.backend == "fake_engines:ScriptedEngine"
    assert isinstance(loaded.engine, EngineProtocol)
