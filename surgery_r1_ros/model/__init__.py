"""The Qwen2.5-VL model: loading a checkpoint folder or the built-in model, its processor and prompts."""

from surgery_r1_ros.model.loading import (
    BUILTIN_DIMS,
    BUILTIN_MODEL_DIR,
    LoadedModel,
    ModelLoadError,
    build_builtin,
    configure_generation,
    load_model,
    load_processor,
    save_model,
)
from surgery_r1_ros.model.processor import (
    FixedSizeImageProcessor,
    SurgeryR1Processor,
    image_size,
    image_token_count,
)
from surgery_r1_ros.model.prompts import IGNORE_INDEX, encode_prompt, prompt_texts
from surgery_r1_ros.model.tokenizer import train_tokenizer

__all__ = [
    "BUILTIN_DIMS",
    "BUILTIN_MODEL_DIR",
    "IGNORE_INDEX",
    "FixedSizeImageProcessor",
    "LoadedModel",
    "ModelLoadError",
    "SurgeryR1Processor",
    "build_builtin",
    "configure_generation",
    "encode_prompt",
    "image_size",
    "image_token_count",
    "load_model",
    "load_processor",
    "prompt_texts",
    "save_model",
    "train_tokenizer",
]
