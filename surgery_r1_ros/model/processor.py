"""An image-only Qwen2.5-VL processor that resizes every image to one fixed size.

A fixed size gives a fixed number of image tokens, so the vision encoder and the image part of the
prompt always have the same shapes (static shapes for export and CUDA graphs), and boxes always live in
the same pixel frame (the model's input size), which the runtime scales back to the camera frame.
The PIL image processor is used so that torchvision is not needed; the video processor is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.image_utils import SizeDict
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

PATCH_SIZE = 14
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # image sides must be multiples of 28
PREPROCESSOR_CONFIG = "preprocessor_config.json"


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
        height, width = image.shape[-2:]
        if (width, height) == (self.fixed_width, self.fixed_height):
            return image
        target = SizeDict(height=self.fixed_height, width=self.fixed_width)
        # Skip Qwen's aspect-preserving smart_resize: go straight to the PIL backend's plain resize.
        return super(Qwen2VLImageProcessorPil, self).resize(image=image, size=target, resample=resample)

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
