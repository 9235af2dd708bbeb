"""Peek into CDR-serialized image messages as bags store them: header stamp and size without decoding pixels."""

from __future__ import annotations

import struct

import numpy as np

from surgery_r1_ros.ros_fields import stamp_to_ns


def _endian(raw: bytes) -> str:
    return "<" if len(raw) > 1 and raw[1] & 1 else ">"


def header_stamp_ns(raw: bytes) -> int:
    """The ``header.stamp`` of a CDR message whose first field is a std_msgs/Header (Image, CameraInfo)."""
    sec, nanosec = struct.unpack_from(_endian(raw) + "iI", raw, 4)
    return stamp_to_ns(sec, nanosec)


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
