"""The node's ROS-free parts: image conversion, frame buffer, worker queue, diagnostics, drawing, loading."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from surgery_r1_ros.node.annotate import draw_answer
from surgery_r1_ros.node.buffer import NS, Frame, FrameBuffer, FrameSelectionError
from surgery_r1_ros.node.diagnostics import OK, WARN, NodeStats
from surgery_r1_ros.node.engine_loader import EngineLoadError, load_engine
from surgery_r1_ros.node.image import (
    ImageError,
    clean_frame_id,
    compressed_to_rgb,
    image_to_rgb,
    rgb_to_image_fields,
)
from surgery_r1_ros.node.params import DEFAULT_IMAGE_TOPIC, DEFAULTS, PARAMETERS
from surgery_r1_ros.node.worker import InferenceWorker, Job, QueueFull


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
        ("rgb8", 15, 89, "size"),  # one byte short
        ("rgb8", 15, 91, "size"),  # one byte too many
        ("rgb8", 14, 84, "size"),  # step shorter than a row
    ],
)
def test_bad_images_are_refused_with_a_reason(encoding, step, size, reason):
    with pytest.raises(ImageError) as err:
        image_to_rgb(6, 5, encoding, step, bytes(size))
    assert err.value.reason == reason
    assert str(err.value)


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


def make_frame(stamp_s: float, received: float) -> Frame:
    return Frame(round(stamp_s * NS), "cam", received, 4, 4, lambda: np.zeros((4, 4, 3), np.uint8))


def test_buffer_newest_nearest_and_errors():
    buf = FrameBuffer(3)
    with pytest.raises(FrameSelectionError) as err:
        buf.select(0, 0.05, 2.0)
    assert err.value.reason == "no_frame"
    now = 100.0
    for i in range(5):
        buf.push(make_frame(10 + i * 0.1, now))
    assert len(buf) == 3  # oldest two dropped
    assert buf.select(0, 0.05, 2.0, now).stamp_ns == round(10.4 * NS)
    assert buf.select(round(10.31 * NS), 0.05, 2.0, now).stamp_ns == round(10.3 * NS)
    with pytest.raises(FrameSelectionError) as err:
        buf.select(round(10.0 * NS), 0.05, 2.0, now)  # dropped from the buffer
    assert err.value.reason == "no_match" and "10.200000000" in str(err.value)
    with pytest.raises(FrameSelectionError) as err:
        buf.select(0, 0.05, 2.0, now + 2.5)
    assert err.value.reason == "stale" and "max_frame_age_s" in str(err.value)


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
    def __init__(self, delay: float = 0.05, fail_on: str = "explode") -> None:
        self.delay, self.fail_on = delay, fail_on
        self.encoded: list = []
        self.gate = threading.Event()
        self.gate.set()

    def encode(self, image, stamp):
        self.encoded.append(stamp)
        return stamp

    def ask(self, question, image=None, stamp=None, reasoning=False, max_new_tokens=None):
        self.gate.wait(5)
        time.sleep(self.delay)
        if self.fail_on in question:
            raise RuntimeError("boom")
        if question == "bad":
            raise ValueError("bad input")
        return {"question": question, "stamp": stamp}


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
        assert first.answer["question"] == "one" and not first.error
        assert worker.depth == 0
        worker.submit(job("four"))  # room again
    finally:
        worker.stop()


def test_worker_survives_engine_failures():
    worker = InferenceWorker(SlowEngine(0.0), 4, encode_ahead=False, input_errors=(ValueError,))
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
        assert wait(lambda: frame.encoded is True)
        assert engine.encoded == [frame.seq]
    finally:
        worker.stop()


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
    loaded = load_engine("", "fake_engines:ScriptedEngine", "auto")
    assert loaded.model == "built-in" and loaded.backend == "fake_engines:ScriptedEngine"
