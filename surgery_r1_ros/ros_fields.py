"""Plain values <-> ROS message fields: stamps as integer nanoseconds, boxes as sensor_msgs/RegionOfInterest.

The node, the bag tools and the tests all convert through here. Importing this module needs no ROS:
``box_to_roi`` imports the message class when it is called, ``roi_to_box`` only reads fields.
"""

from __future__ import annotations

from typing import Any

from surgery_r1_ros.boxes import Box

NS_PER_S = 1_000_000_000


def stamp_to_ns(sec: int, nanosec: int) -> int:
    """``builtin_interfaces/Time`` (sec, nanosec) -> integer nanoseconds."""
    return int(sec) * NS_PER_S + int(nanosec)


def ns_to_stamp(ns: int) -> tuple[int, int]:
    """Integer nanoseconds -> (sec, nanosec) with 0 <= nanosec < 1e9 (also for negative times)."""
    sec, nanosec = divmod(int(ns), NS_PER_S)
    return sec, nanosec


def seconds_to_ns(seconds: float) -> int:
    """Seconds (a float) -> the nearest integer nanoseconds."""
    return round(float(seconds) * NS_PER_S)


def ns_to_seconds(ns: int) -> float:
    return int(ns) / NS_PER_S


def msg_stamp_ns(stamp: Any) -> int:
    """Nanoseconds of a stamp message (anything with ``sec`` and ``nanosec``)."""
    return stamp_to_ns(stamp.sec, stamp.nanosec)


def box_to_roi(box: Box | None) -> Any:
    """x1, y1, x2, y2 pixels -> sensor_msgs/RegionOfInterest; the zero-size region when there is no box."""
    from sensor_msgs.msg import RegionOfInterest

    if box is None:
        return RegionOfInterest()
    x1, y1, x2, y2 = (max(0, round(float(v))) for v in box)
    return RegionOfInterest(x_offset=x1, y_offset=y1, width=max(0, x2 - x1), height=max(0, y2 - y1))


def roi_to_box(roi: Any) -> tuple[int, int, int, int] | None:
    """sensor_msgs/RegionOfInterest -> x1, y1, x2, y2 pixels; None for a zero-size region (no box)."""
    if roi.width <= 0 or roi.height <= 0:
        return None
    x, y = int(roi.x_offset), int(roi.y_offset)
    return x, y, x + int(roi.width), y + int(roi.height)
