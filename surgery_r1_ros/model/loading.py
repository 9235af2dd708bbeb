"""Load a Qwen2.5-VL model folder (a real 3B/7B checkpoint or the built-in small one), or build the built-in.

One code path for both: ``load_model`` reads any local Hugging Face folder holding a
``Qwen2_5_VLForConditionalGeneration`` checkpoint. ``build_builtin`` makes the small built-in
configuration (same architecture, small dimensions, small BPE vocabulary) with random weights; training
fills them in and ``save_model`` writes the folder that ``load_model`` reads back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.utils import logging as hf_logging

from surgery_r1_ros.model.processor import PREPROCESSOR_CONFIG, FixedSizeImageProcessor, SurgeryR1Processor
from surgery_r1_ros.model.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

BUILTIN_MODEL_DIR = Path(__file__).resolve().parent.parent / "resources" / "builtin_model"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_TYPE = "qwen2_5_vl"
# Written beside the weights: which kind of model this is and whether it was trained.
INFO_FILE = "surgery_r1.json"
# Fixed input size for real Qwen2.5-VL checkpoints whose folder does not set one (multiple of 28).
REAL_CHECKPOINT_IMAGE_SIZE = (448, 448)
DEFAULT_MAX_NEW_TOKENS = 256

# The built-in configuration. head_dim = hidden / heads = 64, and mrope_section must sum to head_dim / 2.
BUILTIN_DIMS: dict = {
    "vocab_size": 2048,  # BPE target; the trained vocabulary may come out smaller
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "mrope_section": [8, 12, 12],
    "vision_depth": 2,
    "vision_hidden_size": 128,
    "vision_intermediate_size": 512,
    "vision_num_heads": 2,
    "image_width": 280,
    "image_height": 224,
}
# Colour statistics of endoscope frames (the data's own, not CLIP's: see build_builtin).
DEFAULT_IMAGE_MEAN = (0.62, 0.33, 0.31)
DEFAULT_IMAGE_STD = (0.18, 0.16, 0.16)


class ModelLoadError(RuntimeError):
    """A model folder that cannot be loaded, saying what is wrong and what to do."""


@dataclass
class LoadedModel:
    """A model ready for inference or training, its processor, and the folder it came from (None if built)."""

    model: Qwen2_5_VLForConditionalGeneration
    processor: SurgeryR1Processor
    path: Path | None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def info(self) -> dict:
        """Contents of the folder's ``surgery_r1.json`` (empty for a stock checkpoint)."""
        if self.path is None or not (self.path / INFO_FILE).is_file():
            return {}
        try:
            return json.loads((self.path / INFO_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def save(self, folder: str | Path, info: dict | None = None) -> Path:
        return save_model(self, folder, info)


def configure_generation(model: Qwen2_5_VLForConditionalGeneration, processor: SurgeryR1Processor) -> None:
    """Greedy decoding that stops at <|im_end|>; a config built from scratch has none of this set."""
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
    gc = model.generation_config if model.generation_config is not None else GenerationConfig()
    gc.eos_token_id = im_end
    gc.pad_token_id = pad
    gc.do_sample = False
    gc.num_beams = 1
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if hasattr(gc, name):
            setattr(gc, name, None)
    gc.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    model.generation_config = gc
    model.config.text_config.pad_token_id = pad


def builtin_config(processor: SurgeryR1Processor, **dims) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL config of the built-in model for this processor's vocabulary."""
    d = {**BUILTIN_DIMS, **dims}
    head_dim = d["hidden_size"] // d["num_attention_heads"]
    if sum(d["mrope_section"]) != head_dim // 2:
        raise ValueError(f"mrope_section {d['mrope_section']} must sum to head_dim/2 = {head_dim // 2}")
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}  # fmt: skip
    vocab_size = len(tok)
    vocab_size += -vocab_size % 64  # a multiple of 64 keeps the matmuls aligned
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": d["hidden_size"],
            "intermediate_size": d["intermediate_size"],
            "num_hidden_layers": d["num_hidden_layers"],
            "num_attention_heads": d["num_attention_heads"],
            "num_key_value_heads": d["num_key_value_heads"],
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": d["mrope_section"]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": d["vision_depth"],
            "hidden_size": d["vision_hidden_size"],
            "intermediate_size": d["vision_intermediate_size"],
            "num_heads": d["vision_num_heads"],
            "out_hidden_size": d["hidden_size"],
            "fullatt_block_indexes": [d["vision_depth"] - 1],
            "window_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_builtin(
    texts: Iterable[str] = (),
    image_mean: Sequence[float] = DEFAULT_IMAGE_MEAN,
    image_std: Sequence[float] = DEFAULT_IMAGE_STD,
    *,
    seed: int = 0,
    **dims,
) -> LoadedModel:
    """A randomly initialised built-in model with a BPE trained on the project's text plus ``texts``.

    ``image_mean``/``image_std`` normalise pixels (0..1 scale) per channel. Use the training data's own
    colour statistics: CLIP's mean/std leave flat pink tissue frames nearly identical after the merger.
    ``dims`` override entries of ``BUILTIN_DIMS`` (e.g. ``hidden_size=128``, ``image_width=224``).
    """
    d = {**BUILTIN_DIMS, **dims}
    unknown = set(dims) - set(BUILTIN_DIMS)
    if unknown:
        raise ValueError(f"unknown built-in dimension(s) {sorted(unknown)}; known: {sorted(BUILTIN_DIMS)}")
    tokenizer = train_tokenizer(texts, vocab_size=d["vocab_size"])
    image_processor = FixedSizeImageProcessor(
        fixed_width=d["image_width"],
        fixed_height=d["image_height"],
        image_mean=[float(v) for v in image_mean],
        image_std=[float(v) for v in image_std],
    )
    processor = SurgeryR1Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    config = builtin_config(processor, **dims)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    configure_generation(model, processor)
    return LoadedModel(model, processor, None)


def save_model(loaded: LoadedModel, folder: str | Path, info: dict | None = None) -> Path:
    """Write model (safetensors), processor and ``surgery_r1.json`` to ``folder`` in place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _QuietProgress():
        loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.processor.save_pretrained(folder)
    meta = dict(loaded.info) if loaded.path is not None else {}
    meta.update(info or {})
    meta.setdefault("kind", "builtin" if loaded.path is None else "checkpoint")
    meta["image_size"] = list(loaded.processor.image_processor.fixed_width_height())
    (folder / INFO_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    loaded.path = folder
    return folder


class _QuietProgress:
    """Hide transformers' per-shard progress bars while loading or saving a small model."""

    def __enter__(self) -> None:
        self.enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            hf_logging.enable_progress_bar()


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_folder(folder: Path) -> dict:
    hint = (
        "pass a local Qwen2.5-VL checkpoint folder (config.json, *.safetensors, tokenizer.json, "
        "preprocessor_config.json), or rebuild the built-in model with `make model`"
    )
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist; {hint}")
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is a file, not a folder; {hint}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder} has no config.json, so it is not a Hugging Face model folder; {hint}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{config_file} is not valid JSON ({err}); the download or copy is broken: {hint}"
        ) from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} does not hold a JSON object; {hint}")
    architectures = config.get("architectures") or []
    if config.get("model_type") != MODEL_TYPE or (architectures and ARCHITECTURE not in architectures):
        raise ModelLoadError(
            f"{folder} holds a {config.get('model_type')!r} model ({', '.join(architectures) or 'no architecture'}); "
            f"Surgery-R1 needs a Qwen2.5-VL checkpoint ({ARCHITECTURE}, model_type {MODEL_TYPE!r}), "
            "e.g. Qwen/Qwen2.5-VL-3B-Instruct or -7B-Instruct downloaded to local disk"
        )
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelLoadError(f"{folder} has a config but no weights (*.safetensors); copy the whole checkpoint folder")
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise ModelLoadError(f"{folder} has no tokenizer (tokenizer.json); copy the checkpoint's tokenizer files too")
    if not (folder / PREPROCESSOR_CONFIG).is_file():
        raise ModelLoadError(f"{folder} has no {PREPROCESSOR_CONFIG}; copy the checkpoint's processor files too")
    return config


def load_processor(folder: str | Path, image_size: tuple[int, int] | None = None) -> SurgeryR1Processor:
    """The fixed-size processor of a model folder; ``image_size`` (w, h) overrides the stored size."""
    folder = Path(folder)
    stored = json.loads((folder / PREPROCESSOR_CONFIG).read_text())
    overrides: dict = {}
    if image_size is not None:
        overrides = {"fixed_width": int(image_size[0]), "fixed_height": int(image_size[1])}
    elif "fixed_width" not in stored:  # a stock Qwen2.5-VL folder
        overrides = {"fixed_width": REAL_CHECKPOINT_IMAGE_SIZE[0], "fixed_height": REAL_CHECKPOINT_IMAGE_SIZE[1]}
    return SurgeryR1Processor.from_pretrained(folder, **overrides)


def load_model(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    image_size: tuple[int, int] | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a Qwen2.5-VL folder (default: the built-in model) for inference, in eval mode on ``device``.

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA. Raises ModelLoadError when the folder is
    missing, incomplete, corrupt or holds another architecture.
    """
    folder = Path(path) if path is not None else BUILTIN_MODEL_DIR
    folder = folder.expanduser()
    _check_folder(folder)
    device = torch.device(device if device is not None else _default_device())
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype != "auto" else None
        if not isinstance(dtype, torch.dtype):
            raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        processor = load_processor(folder, image_size)
    except Exception as err:  # tokenizer/processor files are third-party formats: any failure means broken files
        raise ModelLoadError(f"cannot read the tokenizer/processor files in {folder}: {err}") from err
    try:
        with _QuietProgress():
            model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                folder,
                dtype=dtype,
                local_files_only=True,
                attn_implementation=attn_implementation,
                output_loading_info=True,
            )
    except Exception as err:
        if "mismatched" in str(err):
            raise ModelLoadError(
                f"weights in {folder} do not match its config.json (tensor shapes differ); the config belongs to "
                "another model size or the folder mixes files of two checkpoints"
            ) from err
        raise ModelLoadError(f"cannot load the weights in {folder}: {type(err).__name__}: {err}") from err
    missing = [k for k in info.get("missing_keys", ()) if "lm_head" not in k]
    if missing or info.get("mismatched_keys"):
        raise ModelLoadError(
            f"weights in {folder} do not match its config.json (missing {len(missing)} tensors, e.g. "
            f"{(missing or [str(m) for m in info.get('mismatched_keys', ())])[:3]}); the checkpoint is incomplete or "
            "its config belongs to another model size"
        )
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    if image_id != model.config.image_token_id or len(tok) > model.config.text_config.vocab_size:
        raise ModelLoadError(
            f"the tokenizer in {folder} does not belong to its model (image token id {image_id} vs "
            f"{model.config.image_token_id}, vocabulary {len(tok)} vs {model.config.text_config.vocab_size})"
        )
    model.to(device).eval()
    configure_generation(model, processor)
    return LoadedModel(model, processor, folder)
