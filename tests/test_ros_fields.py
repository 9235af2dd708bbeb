"""Stamps <-> nanoseconds and boxes <-> RegionOfInterest: the one conversion the node and the bag tools share."""

from __future__ import annotations

import pytest
from ros_helpers import ros_available

from surgery_r1_ros.ros_fields import box_to_roi, ns_to_stamp, roi_to_box, seconds_to_ns, stamp_to_ns


@pytest.mark.parametrize("ns", [0, 1, 999_999_999, 1_735_689_600_966_666_667, -1, -1_500_000_000])
def test_stamp_round_trip_keeps_nanosec_in_range(ns):
    sec, nanosec = ns_to_stamp(ns)
    assert 0 <= nanosec < 1_000_000_000  # builtin_interfaces/Time: nanosec is unsigned
    assert stamp_to_ns(sec, nanosec) == ns


def test_seconds_to_ns_rounds_to_the_nearest():
    assert ns_to_stamp(-1) == (-1, 999_999_999)
    assert seconds_to_ns(0.51) == 510_000_000 and seconds_to_ns(10.3) == 10_300_000_000


@pytest.mark.skipif(not ros_available(), reason="RegionOfInterest needs the ROS wheels")
def test_box_roi_round_trip():
    roi = box_to_roi((10.4, 20.6, 110.5, 70.0))
    assert (roi.x_offset, roi.y_offset, roi.width, roi.height) == (10, 21, 100, 49)
    assert roi_to_box(roi) == (10, 21, 110, 70)
    assert roi_to_box(box_to_roi(None)) is None  # no box: the zero-size region
    assert roi_to_box(box_to_roi((5, 5, 5, 30))) is None  # an empty box reads back as no box
