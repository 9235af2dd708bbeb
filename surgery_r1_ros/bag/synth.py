"""``bag synth``: a rosbag2 of a continuous synthetic stereo endoscope sequence, with its ground truth.

The bag holds what the dVRK's stereo endoscope publishes, at exactly 30 Hz (stamp ``i`` is
``start + round(i * NS_PER_S / fps)`` ns, so stamps never drift):

    /jhu_daVinci/left/image_raw     sensor_msgs/msg/Image       rgb8, frame_id jhu_daVinci_left
    /jhu_daVinci/left/camera_info   sensor_msgs/msg/CameraInfo
    /jhu_daVinci/right/image_raw    sensor_msgs/msg/Image       rgb8, frame_id jhu_daVinci_right
    /jhu_daVinci/right/camera_info  sensor_msgs/msg/CameraInfo  (P carries the stereo baseline)

Each frame is rendered once; the right eye is the same scene shifted horizontally by the disparity
that the camera model gives at the working distance. The ground truth (questions, answers, boxes of
the left image) at a subset of stamps goes to a JSONL sidecar next to the bag (``OUT.questions.jsonl``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surgery_r1_ros.ros_fields import NS_PER_S, ns_to_seconds, ns_to_stamp, stamp_to_ns
from surgery_r1_ros.vocab import parse_question

log = logging.getLogger(__name__)

NAMESPACE = "/jhu_daVinci"
DVRK_SIZE = (1280, 1024)  # the dVRK HD endoscope (Si/Xi), width x height
DEFAULT_SIZE = (640, 512)  # a quarter of the pixels: 4 s of stereo at 1280x1024 is ~900 MB raw
DEFAULT_START_NS = 1_735_689_600 * 10**9  # 2025-01-01T00:00:00Z: fixed, so the same seed gives the same bag
BASELINE_M = 0.005  # dVRK stereo baseline ~5 mm
WORKING_DISTANCE_M = 0.08  # tissue ~8 cm from the lens
FOCAL_FRACTION = 0.9  # fx = 0.9 * width (a ~70 degree horizontal field of view)


@dataclass
class BagSynthOptions:
    """What ``bag synth`` writes."""

    seconds: float = 4.0
    seed: int = 0
    size: tuple[int, int] = DEFAULT_SIZE
    storage: str = "mcap"
    fps: float = 30.0
    question_every_s: float = 0.5
    difficulty: str = "normal"
    namespace: str = NAMESPACE
    compress: bool = False
    start_ns: int = DEFAULT_START_NS
    stereo: bool = True

    def check(self) -> None:
        if self.storage not in ("mcap", "sqlite3"):
            raise ValueError(f"unknown storage {self.storage!r}: use mcap or sqlite3")
        if not 0 < self.seconds <= 600:
            raise ValueError(f"--seconds {self.seconds}: must be in (0, 600]")
        if not 1 <= self.fps <= 240:
            raise ValueError(f"--fps {self.fps}: must be in [1, 240]")
        if self.question_every_s <= 0:
            raise ValueError("--question-every must be > 0 seconds")
        w, h = self.size
        if not (64 <= w <= 4096 and 64 <= h <= 4096):
            raise ValueError(f"size {w}x{h}: width and height must be between 64 and 4096")
        if not self.namespace.startswith("/"):
            raise ValueError(f"namespace {self.namespace!r} must start with '/'")

    @property
    def n_frames(self) -> int:
        return max(1, round(self.seconds * self.fps))


@dataclass
class BagSynthResult:
    """What was written."""

    bag: Path
    questions: Path
    frames: int
    messages: int
    question_count: int
    question_stamps: int
    bytes: int
    seconds: float
    topics: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"wrote {self.bag} ({self.frames} stereo frames, {self.messages} messages, "
            f"{self.bytes / 1e6:.1f} MB) in {self.seconds:.1f} s\n"
            f"wrote {self.questions} ({self.question_count} questions at {self.question_stamps} stamps)\n"
            f"topics: {', '.join(self.topics)}"
        )


def sidecar_path(bag: Path) -> Path:
    """Where the ground-truth questions of ``bag`` live: ``<bag>.questions.jsonl`` beside it."""
    bag = Path(bag)
    return bag.parent / f"{bag.name}.questions.jsonl"


def stamp_ns(start_ns: int, index: int, fps: float) -> int:
    """Exact stamp of frame ``index`` (no accumulated rounding drift)."""
    return start_ns + round(index * NS_PER_S / fps)


def camera_matrices(size: tuple[int, int], right: bool) -> dict:
    """Pinhole intrinsics of the synthetic endoscope: K, R, P and D as ROS CameraInfo wants them."""
    w, h = size
    fx = fy = FOCAL_FRACTION * w
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    tx = -fx * BASELINE_M if right else 0.0
    return {
        "k": np.array([fx, 0, cx, 0, fy, cy, 0, 0, 1], dtype=np.float64),
        "r": np.eye(3, dtype=np.float64).reshape(9),
        "p": np.array([fx, 0, cx, tx, 0, fy, cy, 0, 0, 0, 1, 0], dtype=np.float64),
        "d": np.zeros(5, dtype=np.float64),
    }


def disparity_px(size: tuple[int, int]) -> int:
    """Horizontal shift between the eyes at the working distance: fx * baseline / depth."""
    return max(1, round(FOCAL_FRACTION * size[0] * BASELINE_M / WORKING_DISTANCE_M))


def right_eye(left: np.ndarray, disparity: int) -> np.ndarray:
    """The right camera's view: the scene moves left by ``disparity`` pixels; the new edge repeats."""
    right = np.empty_like(left)
    right[:, :-disparity] = left[:, disparity:]
    right[:, -disparity:] = left[:, -1:]
    return right


def _frames(options: BagSynthOptions) -> Iterator[tuple[np.ndarray, object]]:
    from surgery_r1_ros.data.synth import render_sequence

    yield from render_sequence(
        options.seed, options.n_frames, size=options.size, difficulty=options.difficulty, continuous=True
    )


def synth_bag(out: str | Path, options: BagSynthOptions | None = None) -> BagSynthResult:
    """Write the bag folder ``out`` and its questions sidecar. ``out`` must not exist yet."""
    from rosbags.rosbag2 import Writer
    from rosbags.rosbag2.enums import CompressionFormat, CompressionMode, StoragePlugin
    from rosbags.typesys import Stores, get_typestore

    options = options or BagSynthOptions()
    options.check()
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists already; remove it or pick another name")
    questions_path = sidecar_path(out)
    started = time.perf_counter()
    typestore = get_typestore(Stores.ROS2_KILTED)
    Image = typestore.types["sensor_msgs/msg/Image"]
    CameraInfo = typestore.types["sensor_msgs/msg/CameraInfo"]
    RegionOfInterest = typestore.types["sensor_msgs/msg/RegionOfInterest"]
    Header = typestore.types["std_msgs/msg/Header"]
    Time = typestore.types["builtin_interfaces/msg/Time"]
    w, h = options.size
    eyes = ("left", "right") if options.stereo else ("left",)
    plugin = StoragePlugin.MCAP if options.storage == "mcap" else StoragePlugin.SQLITE3
    writer = Writer(out, version=9, storage_plugin=plugin)
    if options.compress:
        # mcap: zstd chunks inside the file (readers decompress transparently); sqlite3: per message.
        mode = CompressionMode.STORAGE if options.storage == "mcap" else CompressionMode.MESSAGE
        writer.set_compression(mode, CompressionFormat.ZSTD)
    for key, value in {
        "surgery_r1.generator": "surgery-r1 bag synth",
        "surgery_r1.seed": str(options.seed),
        "surgery_r1.size": f"{w}x{h}",
        "surgery_r1.fps": f"{options.fps:g}",
        "surgery_r1.difficulty": options.difficulty,
        "surgery_r1.questions": questions_path.name,
    }.items():
        writer.set_custom_data(key, value)

    qos = _sensor_qos()
    every = max(1, round(options.question_every_s * options.fps))
    disparity = disparity_px(options.size)
    frames = messages = n_questions = n_stamps = 0
    topics: list[str] = []
    questions_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_questions = questions_path.with_suffix(".jsonl.part")
    try:
        writer.open()
        conns = {}
        for eye in eyes:
            for kind, msgtype in (
                ("image_raw", "sensor_msgs/msg/Image"),
                ("camera_info", "sensor_msgs/msg/CameraInfo"),
            ):
                topic = f"{options.namespace}/{eye}/{kind}"
                conns[eye, kind] = writer.add_connection(topic, msgtype, typestore=typestore, offered_qos_profiles=qos)
                topics.append(topic)
        infos = {eye: camera_matrices(options.size, right=eye == "right") for eye in eyes}
        with tmp_questions.open("w") as qfile:
            for index, (rgb, truth) in enumerate(_frames(options)):
                if index >= options.n_frames:
                    break
                rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
                if rgb.shape != (h, w, 3):
                    raise RuntimeError(f"scene renderer gave a {rgb.shape} frame, expected {(h, w, 3)}")
                ns = stamp_ns(options.start_ns, index, options.fps)
                sec, nanosec = ns_to_stamp(ns)
                for eye in eyes:
                    header = Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id=f"{options.namespace[1:]}_{eye}")
                    pixels = rgb if eye == "left" else right_eye(rgb, disparity)
                    image = Image(
                        header=header,
                        height=h,
                        width=w,
                        encoding="rgb8",
                        is_bigendian=0,
                        step=w * 3,
                        data=pixels.reshape(-1),
                    )
                    m = infos[eye]
                    info = CameraInfo(
                        header=header,
                        height=h,
                        width=w,
                        distortion_model="plumb_bob",
                        d=m["d"],
                        k=m["k"],
                        r=m["r"],
                        p=m["p"],
                        binning_x=0,
                        binning_y=0,
                        roi=RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
                    )
                    writer.write(conns[eye, "image_raw"], ns, typestore.serialize_cdr(image, Image.__msgtype__))
                    writer.write(conns[eye, "camera_info"], ns, typestore.serialize_cdr(info, CameraInfo.__msgtype__))
                    messages += 2
                frames += 1
                if index % every == 0:
                    n_stamps += 1
                    for row in question_rows(truth, index, ns, options):
                        qfile.write(json.dumps(row) + "\n")
                        n_questions += 1
        writer.close()
    except BaseException:
        tmp_questions.unlink(missing_ok=True)
        with contextlib.suppress(Exception):  # the real error is the one being raised
            writer.close()
        raise
    tmp_questions.replace(questions_path)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return BagSynthResult(
        bag=out,
        questions=questions_path,
        frames=frames,
        messages=messages,
        question_count=n_questions,
        question_stamps=n_stamps,
        bytes=size,
        seconds=time.perf_counter() - started,
        topics=topics,
    )


def question_rows(truth, index: int, ns: int, options: BagSynthOptions) -> list[dict]:
    """The sidecar lines of one frame: every ground-truth question with its answer and left-image box."""
    sec, nanosec = ns_to_stamp(ns)
    rows = []
    for question, answer, box in truth.qas():
        try:
            kind, subject = parse_question(question)
        except ValueError:
            kind, subject = None, None
        rows.append(
            {
                "stamp": {"sec": sec, "nanosec": nanosec},
                "t": round(ns_to_seconds(ns - options.start_ns), 9),
                "frame": index,
                "question": question,
                "answer": answer,
                "box": [round(float(v), 2) for v in box],
                "image_size": list(options.size),
                "subject": subject,
                "kind": str(kind) if kind is not None else None,
            }
        )
    return rows


def _sensor_qos():
    """The QoS a camera driver offers (best effort, keep last 5): recorded so players can reuse it."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    infinite = QosTime(sec=0, nsec=0)
    return [
        Qos(
            history=QosHistory.KEEP_LAST,
            depth=5,
            reliability=QosReliability.BEST_EFFORT,
            durability=QosDurability.VOLATILE,
            deadline=infinite,
            lifespan=infinite,
            liveliness=QosLiveliness.AUTOMATIC,
            liveliness_lease_duration=infinite,
            avoid_ros_namespace_conventions=False,
        )
    ]


def load_questions(path: str | Path) -> list[dict]:
    """Read a questions JSONL (the ``bag synth`` sidecar format); errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"questions file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON: {err}") from None
        if not isinstance(row, dict) or "question" not in row or ("stamp" not in row and "t" not in row):
            raise ValueError(f"{path}:{number}: needs 'question' and a 'stamp' {{sec, nanosec}} or 't' (seconds)")
        if "stamp" in row:
            stamp = row["stamp"]
            try:
                row["stamp_ns"] = stamp_to_ns(stamp["sec"], stamp["nanosec"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}:{number}: 'stamp' must be {{sec, nanosec}}") from None
        row["line"] = number
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no questions")
    return rows


__all__ = [
    "DEFAULT_SIZE",
    "DVRK_SIZE",
    "BagSynthOptions",
    "BagSynthResult",
    "load_questions",
    "sidecar_path",
    "synth_bag",
]
