"""sensor_msgs Image / CompressedImage fields <-> numpy RGB, without ROS and without cv_bridge.

The functions take the message's plain fields (height, width, encoding, step, data), so they are unit-tested
without a ROS graph. ``np.frombuffer`` views the message's own buffer: an rgb8 frame is never copied, and
the other accepted encodings cost one colour conversion.

Intake checks (``check_image``, ``check_compressed``) refuse what the engine cannot use, without touching
the pixels: an unsupported encoding (16-bit, Bayer, YUV, compressed depth), a malformed message (a data size
that does not match height * step, a step shorter than a row, a compressed frame that is not a JPEG or PNG),
and frames with a side outside the engine's ``MIN_SIDE`` .. ``MAX_SIDE``. Each raises ``ImageError`` whose
``reason`` is a short key the node counts in its diagnostics. ``is_bigendian`` is ignored: every accepted
encoding has 8-bit channels, which have no byte order.
"""

from __future__ import annotations

import array

import cv2
import numpy as np

from surgery_r1_ros.engine.api import MAX_SIDE, MIN_SIDE

# encoding -> channels. rgb8 is what the model wants; the others are converted.
ACCEPTED_ENCODINGS: dict[str, int] = {"rgb8": 3, "bgr8": 3, "mono8": 1, "rgba8": 4, "bgra8": 4}
_TO_RGB = {
    "bgr8": cv2.COLOR_BGR2RGB,
    "mono8": cv2.COLOR_GRAY2RGB,
    "rgba8": cv2.COLOR_RGBA2RGB,
    "bgra8": cv2.COLOR_BGRA2RGB,
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (the frame header with precision and size): C0..CF but DHT, JPG and DAC
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageError(ValueError):
    """An image the node cannot use; ``reason`` is a short counter key.

    Reasons: "encoding" (unsupported), "malformed" (fields or bytes that do not make an image), "decode"
    (compressed bytes that do not decode), "too_small" / "too_large" (a side outside MIN_SIDE..MAX_SIDE).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_sides(width: int, height: int) -> None:
    """Refuse a frame the engine cannot take: each side within MIN_SIDE .. MAX_SIDE pixels."""
    if min(width, height) < MIN_SIDE:
        raise ImageError("too_small", f"image {width}x{height} is too small; each side needs {MIN_SIDE}+ pixels")
    if max(width, height) > MAX_SIDE:
        raise ImageError("too_large", f"image {width}x{height} is too large; at most {MAX_SIDE} pixels a side")


def image_layout(height: int, width: int, encoding: str, step: int, data_size: int) -> int:
    """Check that raw Image fields describe ``data_size`` bytes of an accepted encoding; returns the channels."""
    channels = ACCEPTED_ENCODINGS.get(encoding.lower())
    if channels is None:
        raise ImageError(
            "encoding", f"unsupported encoding {encoding[:40]!r}: accepted {', '.join(ACCEPTED_ENCODINGS)}"
        )
    if height <= 0 or width <= 0:
        raise ImageError("malformed", f"empty image {width}x{height}")
    if step < width * channels:
        raise ImageError(
            "malformed", f"step {step} is shorter than a row of {width} {encoding} pixels ({width * channels})"
        )
    if data_size != height * step:
        raise ImageError(
            "malformed",
            f"data has {data_size} bytes but {encoding} {width}x{height} with step {step} needs {height * step}",
        )
    return channels


def check_image(height: int, width: int, encoding: str, step: int, data_size: int) -> int:
    """Intake check of a raw Image without touching the pixels: layout and size; returns the channel count."""
    channels = image_layout(height, width, encoding, step, data_size)
    check_sides(width, height)
    return channels


def compressed_size(data) -> tuple[int, int]:
    """(width, height) from a JPEG or PNG header, without decoding; ImageError for anything else."""
    head = memoryview(data).cast("B")
    if bytes(head[:8]) == _PNG_SIGNATURE:
        if len(head) < 26 or bytes(head[12:16]) != b"IHDR":
            raise ImageError("decode", "PNG image without its IHDR header")
        if head[24] != 8:
            raise ImageError("encoding", f"PNG with {head[24]}-bit channels: only 8-bit is accepted")
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if bytes(head[:2]) == b"\xff\xd8":
        return _jpeg_size(head)
    raise ImageError(
        "decode", f"compressed image is not a JPEG or PNG ({len(head)} bytes, starting {bytes(head[:8]).hex()})"
    )


def _jpeg_size(head: memoryview) -> tuple[int, int]:
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            break
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _JPEG_SOF:
            if i + 9 > len(head):
                break
            if head[i + 4] != 8:
                raise ImageError("encoding", f"JPEG with {head[i + 4]}-bit samples: only 8-bit is accepted")
            return int.from_bytes(head[i + 7 : i + 9], "big"), int.from_bytes(head[i + 5 : i + 7], "big")
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        i += 2 + int.from_bytes(head[i + 2 : i + 4], "big")
    raise ImageError("decode", "JPEG image without a readable frame header")


def check_compressed(fmt: str, data) -> tuple[int, int]:
    """Intake check of a CompressedImage from its header: JPEG or PNG, 8-bit, sides in range; (width, height).

    The body is decoded on first use (``compressed_to_rgb``); a body that fails then is dropped by the buffer.
    """
    _check_format(fmt, len(data))
    width, height = compressed_size(data)
    check_sides(width, height)
    return width, height


def _check_format(fmt: str, size: int) -> None:
    if size == 0:
        raise ImageError("decode", "compressed image is empty")
    if "compressedDepth" in fmt:
        raise ImageError("encoding", f"unsupported compressed format {fmt[:40]!r}: depth images are not accepted")


def image_to_rgb(height: int, width: int, encoding: str, step: int, data) -> np.ndarray:
    """An (height, width, 3) uint8 RGB array from raw Image fields.

    ``data`` is anything with the buffer protocol (the message's ``array.array``, bytes, a numpy array).
    rgb8 with no row padding returns a read-only view of ``data``; the rest returns a new array.
    """
    buffer = np.frombuffer(data, dtype=np.uint8)
    channels = image_layout(height, width, encoding, step, buffer.size)
    rows = buffer.reshape(height, step)
    pixels = rows[:, : width * channels].reshape(height, width, channels)  # drops row padding (a view)
    code = _TO_RGB.get(encoding.lower())
    if code is None:  # rgb8
        return pixels
    return cv2.cvtColor(np.ascontiguousarray(pixels[:, :, 0] if channels == 1 else pixels), code)


def compressed_to_rgb(fmt: str, data) -> np.ndarray:
    """Decode a CompressedImage (jpeg or png, as image_transport's compressed plugin writes) to RGB."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    _check_format(fmt, buffer.size)
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
