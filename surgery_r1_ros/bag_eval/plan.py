"""Which questions ``bag eval`` asks about which bag image: each question goes to the image whose header stamp
is nearest, within a tolerance; the others are counted with the reason. ROS-free.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from surgery_r1_ros.bag.cdr import header_stamp_ns, image_size_from_cdr
from surgery_r1_ros.bag.reader import BagReader
from surgery_r1_ros.bag_eval.report import AskedQuestion, spread
from surgery_r1_ros.ros_fields import ns_to_seconds, seconds_to_ns


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
    tolerance = seconds_to_ns(tolerance_s)
    ordered = np.array(sorted(set(stamps)), dtype=np.int64)
    questions = []
    for i, row in enumerate(rows):
        stamp = int(row["stamp_ns"]) if "stamp_ns" in row else bag_start_ns + seconds_to_ns(float(row["t"]))
        t = float(row.get("t", ns_to_seconds(stamp - bag_start_ns)))
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
