"""An image-only Qwen2.5-VL processor that resizes every image to one fixed size.

A fixed size gives a fixed number of image tokens, so the vision encoder and the image part of the
prompt always have the same shapes (static shapes for export and CUDA graphs), and boxes always live in
the same pixel frame (the model's input size), which the runtime scales back to the camera frame.
The PIL image processor is used so that torchvision is not needed; the video processor is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.image_utils import SizeDict
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

PATCH_SIZE = 14
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # image sides must be multiples of 28
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def resize_frame(
    image: np.ndarray, size: tuple[int, int], *, out: np.ndarray | None = None, scratch: np.ndarray | None = None
) -> np.ndarray:
    """An (h, w, c) frame resized to ``size`` (w, h), anti-aliased when shrinking.

    A frame at least twice the target size is resized bilinearly to exactly twice the target, then averaged
    2x2 (cv2's integer area path); a smaller one is area-averaged or, when growing, resized bicubically.
    cv2 rather than PIL, and two steps rather than one area resize: a 1280x1024 frame takes ~0.8 ms this way,
    ~6 ms with one non-integer area resize and ~15 ms with PIL's bicubic filter on the 2-core CPU.
    ``out`` (h, w, c) and ``scratch`` (2h, 2w, c), when given, are written instead of new arrays.
    """
    w, h = size
    if image.shape[1] >= 2 * w and image.shape[0] >= 2 * h:
        image = cv2.resize(image, (2 * w, 2 * h), dst=scratch, interpolation=cv2.INTER_LINEAR)
    shrink = image.shape[1] >= w and image.shape[0] >= h
    resized = cv2.resize(image, (w, h), dst=out, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return resized.reshape(h, w, -1) if image.ndim == 3 else resized


class FixedSizeImageProcessor(Qwen2VLImageProcessorPil):
    """Qwen2-VL's PIL image processor, resizing every image to ``fixed_width`` x ``fixed_height``."""

    fixed_width: int = 280
    fixed_height: int = 224

    def __init__(self, fixed_width: int = 280, fixed_height: int = 224, **kwargs) -> None:
        for name, value in (("width", fixed_width), ("height", fixed_height)):
            if value <= 0 or value % FACTOR:
                raise ValueError(
                    f"fixed image {name} {value} must be a positive multiple of {FACTOR} (patch 14 x merge 2)"
                )
        pixels = fixed_width * fixed_height
        kwargs.pop("min_pixels", None)
        kwargs.pop("max_pixels", None)
        kwargs["size"] = {"shortest_edge": pixels, "longest_edge": pixels}
        super().__init__(**kwargs)
        self.fixed_width = int(fixed_width)
        self.fixed_height = int(fixed_height)

    def resize(self, image: np.ndarray, size: SizeDict, resample=None, factor: int = FACTOR, **kwargs) -> np.ndarray:
        """Straight to the fixed size (no aspect-preserving smart_resize) with :func:`resize_frame`, the resize
        the runtime's :class:`PixelValues` uses, so training and runtime see the same pixels."""
        height, width = image.shape[-2:]
        if (width, height) == (self.fixed_width, self.fixed_height):
            return image
        resized = resize_frame(np.ascontiguousarray(np.moveaxis(image, 0, -1)), (self.fixed_width, self.fixed_height))
        return np.moveaxis(resized, -1, 0)

    def fixed_width_height(self) -> tuple[int, int]:
        return self.fixed_width, self.fixed_height

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        return (self.fixed_height // PATCH_SIZE) * (self.fixed_width // PATCH_SIZE)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["fixed_width"] = self.fixed_width
        out["fixed_height"] = self.fixed_height
        out["image_processor_type"] = type(self).__name__
        return out

    @classmethod
    def from_folder(cls, folder: Path, **overrides) -> FixedSizeImageProcessor:
        """Build from a folder's ``preprocessor_config.json`` (ours, or a stock Qwen2.5-VL one plus ``overrides``)."""
        config = json.loads((Path(folder) / PREPROCESSOR_CONFIG).read_text())
        keep = {
            k: config[k]
            for k in ("image_mean", "image_std", "do_rescale", "rescale_factor", "do_normalize", "resample",
                      "fixed_width", "fixed_height", "patch_size", "temporal_patch_size", "merge_size")
            if k in config
        }  # fmt: skip
        keep.update(overrides)
        return cls(**keep)


class SurgeryR1Processor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor for images and text only (no video processor, so no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, folder, **overrides) -> SurgeryR1Processor:  # type: ignore[override]
        """Load tokenizer, chat template and fixed-size image processor from a local folder."""
        folder = Path(folder)
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(folder)
        image_processor = FixedSizeImageProcessor.from_folder(folder, **overrides)
        template = tokenizer.chat_template
        template_file = folder / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text()
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)

    def save_pretrained(self, save_directory, **kwargs):  # type: ignore[override]
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(self.image_processor.to_dict(), indent=2) + "\n")
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template)
        return [str(folder / PREPROCESSOR_CONFIG)]


def image_size(processor: SurgeryR1Processor) -> tuple[int, int]:
    """The (width, height) every image is resized to: the pixel frame of the model's boxes."""
    ip = processor.image_processor
    return ip.fixed_width, ip.fixed_height


def image_token_count(processor: SurgeryR1Processor) -> int:
    """Number of <|image_pad|> tokens one image becomes (patches / merge^2)."""
    w, h = image_size(processor)
    return (w // PATCH_SIZE) * (h // PATCH_SIZE) // (MERGE_SIZE * MERGE_SIZE)


class PixelValues:
    """``pixel_values`` of RGB uint8 frames, as the image processor makes them, in numpy and cv2 alone.

    A frame is resized straight to the model's size with :func:`resize_frame` (as the processor does), then
    rescaled and normalised with the processor's mean/std in one table lookup, and cut into Qwen2-VL's patch
    order: (grid_h * grid_w, 3 * temporal_patch * patch * patch), merge groups of 2x2 patches adjacent.
    Hand-written because the processor's own path costs ~20 ms a 1280x1024 frame on the CPU (the training
    loader and the runtime call this per frame); ``tests/test_model.py`` keeps it equal to the processor.

    With ``reuse_buffers`` every array of a call is kept and written again by the next call, so the result is
    only valid until then (the engine hands it to the model at once). Measured on the 2-core CPU, a
    1280x1024 frame: 1.7-2.6 ms p50 with the buffers kept, 2.7-3.0 ms with fresh arrays, whose megabytes
    glibc maps from the kernel anew on many calls (page faults; 7.7-8.7 ms with the earlier numpy lookup).
    """

    def __init__(self, processor: SurgeryR1Processor, *, reuse_buffers: bool = False) -> None:
        ip = processor.image_processor
        self.size = image_size(processor)
        self.patch, self.merge, self.temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        levels = np.arange(256, dtype=np.float32)[:, None] * np.float32(ip.rescale_factor)
        table = (levels - np.asarray(ip.image_mean, np.float32)) / np.asarray(ip.image_std, np.float32)
        self.table = np.ascontiguousarray(table.reshape(1, 256, 3), np.float32)  # uint8 -> normalised, per channel
        self.reuse_buffers = reuse_buffers
        self._buffers: dict[str, np.ndarray] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray | None:
        """A kept array of this shape (None without ``reuse_buffers``: the callee allocates)."""
        if not self.reuse_buffers:
            return None
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self._buffers[name] = np.empty(shape, dtype)
        return buffer

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 (h, w, 3) array, got {image.dtype} {image.shape}")
        w, h = self.size
        if image.shape[:2] != (h, w):
            image = resize_frame(
                image, (w, h), out=self._buffer("resized", (h, w, 3), np.uint8),
                scratch=self._buffer("scratch", (2 * h, 2 * w, 3), np.uint8),
            )  # fmt: skip
        x = cv2.LUT(np.ascontiguousarray(image), self.table, dst=self._buffer("normalised", (h, w, 3), np.float32))
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        x = x.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, C, p, p)
        shape = (gh // m, gw // m, m, m, 3, t, p, p)
        out = self._buffer("pixel_values", shape, np.float32)
        out = np.empty(shape, np.float32) if out is None else out
        for step in range(t):  # the frame repeated over time, written straight into patch order
            out[..., step, :, :] = x
        return out.reshape(gh * gw, 3 * t * p * p)


def pixel_values_from_array(image: np.ndarray, processor: SurgeryR1Processor) -> np.ndarray:
    """``pixel_values`` of one RGB uint8 frame in new arrays (see :class:`PixelValues`)."""
    return PixelValues(processor)(image)
