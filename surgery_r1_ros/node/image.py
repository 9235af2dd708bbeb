"""sensor_msgs Image / CompressedImage fields <-> numpy RGB, without ROS and without cv_bridge.

The functions take the message's plain fields (height, width, encoding, step, data), so they are unit-tested
without a ROS graph. ``np.frombuffer`` views the message's own buffer: an rgb8 frame is never copied, and
the other accepted encodings cost one colour conversion. Anything else (16-bit, Bayer, YUV, a data size
that does not match height * step, a step shorter than a row) raises ``ImageError`` whose ``reason`` is a
short key the node counts in its diagnostics.
"""

from __future__ import annotations

import array

import cv2
import numpy as np

# encoding -> channels. rgb8 is what the model wants; the others are converted.
ACCEPTED_ENCODINGS: dict[str, int] = {"rgb8": 3, "bgr8": 3, "mono8": 1, "rgba8": 4, "bgra8": 4}
_TO_RGB = {
    "bgr8": cv2.COLOR_BGR2RGB,
    "mono8": cv2.COLOR_GRAY2RGB,
    "rgba8": cv2.COLOR_RGBA2RGB,
    "bgra8": cv2.COLOR_BGRA2RGB,
}


class ImageError(ValueError):
    """An image the node cannot use; ``reason`` is a short counter key ("encoding", "size", ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_image(height: int, width: int, encoding: str, step: int, data_size: int) -> int:
    """Validate raw image fields without touching the pixels; returns the channel count."""
    channels = ACCEPTED_ENCODINGS.get(encoding.lower())
    if channels is None:
        raise ImageError(
            "encoding",
            f"unsupported encoding {encoding!r}: accepted {', '.join(ACCEPTED_ENCODINGS)}",
        )
    if height <= 0 or width <= 0:
        raise ImageError("size", f"empty image {width}x{height}")
    if step < width * channels:
        raise ImageError("size", f"step {step} is shorter than a row of {width} {encoding} pixels ({width * channels})")
    if data_size != height * step:
        raise ImageError(
            "size", f"data has {data_size} bytes but {encoding} {width}x{height} with step {step} needs {height * step}"
        )
    return channels


def image_to_rgb(height: int, width: int, encoding: str, step: int, data) -> np.ndarray:
    """An (height, width, 3) uint8 RGB array from raw Image fields.

    ``data`` is anything with the buffer protocol (the message's ``array.array``, bytes, a numpy array).
    rgb8 with no row padding returns a read-only view of ``data``; the rest returns a new array.
    """
    buffer = np.frombuffer(data, dtype=np.uint8)
    channels = check_image(height, width, encoding, step, buffer.size)
    rows = buffer.reshape(height, step)
    pixels = rows[:, : width * channels].reshape(height, width, channels)  # drops row padding (a view)
    code = _TO_RGB.get(encoding.lower())
    if code is None:  # rgb8
        return pixels
    return cv2.cvtColor(np.ascontiguousarray(pixels[:, :, 0] if channels == 1 else pixels), code)


def compressed_to_rgb(fmt: str, data) -> np.ndarray:
    """Decode a CompressedImage (jpeg or png, as image_transport's compressed plugin writes) to RGB."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size == 0:
        raise ImageError("decode", "compressed image is empty")
    if "compressedDepth" in fmt:
        raise ImageError("encoding", f"unsupported compressed format {fmt!r}: depth images are not accepted")
    decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ImageError("decode", f"could not decode the {fmt or 'compressed'} image ({buffer.size} bytes)")
    if decoded.dtype != np.uint8:
        raise ImageError("encoding", f"unsupported compressed image depth {decoded.dtype}: only 8-bit is accepted")
    if decoded.ndim == 2:
        return cv2.cvtColor(decoded, cv2.COLOR_GRAY2RGB)
    if decoded.shape[2] == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def rgb_to_image_fields(rgb: np.ndarray) -> tuple[int, int, str, int, array.array]:
    """(height, width, "rgb8", step, data) for publishing an RGB array as a sensor_msgs/Image.

    ``data`` is an ``array.array('B')``: the generated message class accepts it as is, whereas assigning
    bytes or a numpy array makes it check every element (hundreds of milliseconds for a 1280x1024 frame).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    data = array.array("B")
    data.frombytes(np.ascontiguousarray(rgb))
    return height, width, "rgb8", width * 3, data


def clean_frame_id(frame_id: str) -> str:
    """tf2 frame ids have no leading '/': gscam (and ROS 1 habits) often send "/camera"."""
    return frame_id.lstrip("/")
