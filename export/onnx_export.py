"""Export a Qwen2.5-VL model folder to ONNX: a fixed-size vision encoder and a text decoder with past key/values.

What is written to the output folder (everything the onnxruntime and TensorRT backends need, no guessing):

- ``vision.onnx``: ``pixel_values`` (patches of one image at the model's fixed size) -> ``image_embeds``
  (one row per <|image_pad|> token). The image grid is fixed, so window attention indices are constants.
- ``decoder.onnx``: ``inputs_embeds`` (1, seq, hidden), ``attention_mask`` (1, past + seq),
  ``position_ids`` (3, 1, seq: Qwen2.5-VL's M-RoPE rows), ``past_key.<i>`` / ``past_value.<i>``
  (1, kv_heads, past, head_dim) -> ``logits`` of the last position (1, vocab), its argmax ``next_token`` (1,)
  and ``present_key.<i>`` /
  ``present_value.<i>`` (1, kv_heads, past + seq, head_dim). Prefill is a call with past = 0.
- ``embed_tokens.npy``: the token embedding matrix (the decoder takes embeddings, so that image rows can be
  spliced in); the output head (``lm_head``) is inside ``decoder.onnx``, tied to this matrix or not.
- ``processor/``: tokenizer, chat template and fixed-size image processor of the model.
- ``export_manifest.json``: input/output names, shapes, dtypes, image size, token ids, model config hash,
  opset and the sha256 of each ONNX file (the TensorRT engine cache key).

The folder layout, the manifest's reading and the on-demand export cache are in
``surgery_r1_ros.engine.artifacts`` (torch-free; the runtime reads it without importing this module).

Exported with the TorchScript-based exporter (``dynamo=False``): optimum cannot export Qwen2.5-VL with
transformers 5.x, and the dynamo exporter needs the vision tower's window indices precomputed. A LoRA adapter
folder (``adapter_config.json``) is merged into its base model first.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from surgery_r1_ros.engine.artifacts import (
    DECODER_FILE,
    EMBEDDINGS_FILE,
    FORMAT,
    FORMAT_VERSION,
    PROCESSOR_DIR,
    VISION_FILE,
    past_names,
    present_names,
    write_manifest,
)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# Example sizes used only to trace the decoder; every sequence axis is exported dynamic.
TRACE_PAST, TRACE_SEQ = 5, 3


# --------------------------------------------------------------------------------------------- torch wrappers


class VisionEncoder(nn.Module):
    """Vision tower + merger for one image of a fixed grid: pixel_values (patches, C*T*P*P) -> (tokens, hidden)."""

    def __init__(self, model: nn.Module, grid_thw: torch.Tensor) -> None:
        super().__init__()
        self.visual = _inner(model).visual
        self.register_buffer("grid_thw", grid_thw.to(torch.long).reshape(1, 3), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=self.grid_thw)
        return getattr(out, "pooler_output", out)


class TextDecoder(nn.Module):
    """The language model with flat past tensors in and last-position logits + present tensors out.

    ``next_token`` is the greedy choice (argmax of the logits). The 4-D attention mask is built here (causal
    over past + new tokens, and the 2-D padding mask), so the graph needs no transformers mask logic; the
    cache is a DynamicCache filled from the past tensors.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        inner = _inner(model)
        self.language_model = inner.language_model
        self.lm_head = model.lm_head
        self.text_config = model.config.text_config
        self.num_layers = int(self.text_config.num_hidden_layers)
        params = inspect.signature(self.language_model.forward).parameters
        # transformers renamed past_key_values -> cache (5.2x); the GPU machine's 5.17 may use the old name.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        past_len = past[0].shape[2]
        seq = inputs_embeds.shape[1]
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)], config=self.text_config)
        rows = torch.arange(seq, device=inputs_embeds.device).unsqueeze(1) + past_len
        cols = torch.arange(past_len + seq, device=inputs_embeds.device).unsqueeze(0)
        allowed = (cols <= rows)[None, None] & attention_mask[:, None, None, :].to(torch.bool)
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask={"full_attention": mask},
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kwarg: cache},
        )
        logits = self.lm_head(out.last_hidden_state[:, -1, :])
        next_token = logits.argmax(-1)  # greedy decoding on the device: 8 bytes to copy back, not the logits
        present: list[torch.Tensor] = []
        for i in range(self.num_layers):
            present += list(_layer_kv(cache, i))
        return (logits, next_token, *present)


def _inner(model: nn.Module) -> nn.Module:
    """Qwen2_5_VLModel inside a Qwen2_5_VLForConditionalGeneration."""
    return model.model


def _layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]  # older transformers


# --------------------------------------------------------------------------------------------- loading


def load_for_export(model_dir: str | Path | None, attn_implementation: str = "eager"):
    """LoadedModel on CPU in float32 (eager attention traces cleanly); a peft adapter folder is merged first."""
    from surgery_r1_ros.model import load_model, load_processor

    folder = Path(model_dir).expanduser() if model_dir is not None else None
    if folder is not None and (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        adapter = json.loads((folder / "adapter_config.json").read_text())
        base = adapter.get("base_model_name_or_path")
        if not base or not Path(base).expanduser().is_dir():
            raise FileNotFoundError(
                f"{folder} is a LoRA adapter whose base model {base!r} is not a local folder; "
                "set base_model_name_or_path in adapter_config.json to the base checkpoint folder"
            )
        loaded = load_model(base, device="cpu", dtype=torch.float32, attn_implementation=attn_implementation)
        log.info("merging LoRA adapter %s into %s", folder, base)
        loaded.model = PeftModel.from_pretrained(loaded.model, folder).merge_and_unload().eval()
        if (folder / "tokenizer.json").is_file() and (folder / "preprocessor_config.json").is_file():
            loaded.processor = load_processor(folder)
        loaded.path = folder
        return loaded
    return load_model(folder, device="cpu", dtype=torch.float32, attn_implementation=attn_implementation)


def config_hash(model: nn.Module) -> str:
    """sha256 of the model config (architecture and sizes), without fields that change between saves."""
    config = model.config.to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "_commit_hash"):
        config.pop(key, None)
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def onnx_sha256(path: str | Path) -> str:
    """sha256 of an ONNX file together with its external data files (large models), streamed."""
    import onnx

    path = Path(path)
    digest = hashlib.sha256()
    files = [path]
    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    files += [path.parent / loc for loc in sorted(locations)]
    for file in files:
        with file.open("rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- export


@dataclass
class ExampleInputs:
    """One encoded prompt: what tracing and the parity check run."""

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


def example_inputs(loaded, seed: int = 0) -> ExampleInputs:
    from surgery_r1_ros.model import encode_prompt, image_size
    from surgery_r1_ros.protocol import PromptMode

    w, h = image_size(loaded.processor)
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    batch = encode_prompt(loaded.processor, [image], ["What organ is being operated?"], PromptMode.GROUND)
    return ExampleInputs(
        batch["input_ids"], batch["mm_token_type_ids"], batch["pixel_values"].float(), batch["image_grid_thw"]
    )


def _spec(name: str, shape: list, dtype: str) -> dict:
    return {"name": name, "shape": shape, "dtype": dtype}


def _export(module: nn.Module, args: tuple, path: Path, opset: int, **kwargs) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        # Tracing warnings (python ints, .tolist() in the fixed-grid vision code) are expected: shapes are fixed.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), opset_version=opset, do_constant_folding=True, dynamo=False, **kwargs
        )


def export_onnx(model_dir: str | Path | None, out_dir: str | Path, *, opset: int = DEFAULT_OPSET, loaded=None) -> dict:
    """Export ``model_dir`` (default: the built-in model) to ``out_dir``; returns the manifest written there."""
    from surgery_r1_ros.model import image_size, image_token_count

    start = time.perf_counter()
    loaded = loaded if loaded is not None else load_for_export(model_dir)
    model = loaded.model.float().eval()
    processor = loaded.processor
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    text = model.config.text_config
    num_layers = int(text.num_hidden_layers)
    kv_heads = int(text.num_key_value_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // int(text.num_attention_heads))
    vocab = int(text.vocab_size)
    example = example_inputs(loaded)
    grid = example.image_grid_thw.reshape(-1)
    n_patches, patch_dim = (int(v) for v in example.pixel_values.shape)

    # Vision encoder: fixed grid, so no dynamic axes.
    vision = VisionEncoder(model, example.image_grid_thw).eval()
    with torch.no_grad():
        n_tokens = int(vision(example.pixel_values).shape[0])
    _export(
        vision, (example.pixel_values,), out / VISION_FILE, opset,
        input_names=["pixel_values"], output_names=["image_embeds"],
    )  # fmt: skip

    # Text decoder with past key/values: sequence and past lengths are dynamic.
    decoder = TextDecoder(model).eval()
    pasts, presents = past_names(num_layers), present_names(num_layers)
    trace_past = [torch.randn(1, kv_heads, TRACE_PAST, head_dim) for _ in pasts]
    trace_args = (
        torch.randn(1, TRACE_SEQ, hidden),
        torch.ones(1, TRACE_PAST + TRACE_SEQ, dtype=torch.long),
        (torch.arange(TRACE_SEQ) + TRACE_PAST).view(1, 1, -1).expand(3, 1, -1).contiguous(),
        *trace_past,
    )
    dynamic = {"inputs_embeds": {1: "seq"}, "attention_mask": {1: "total"}, "position_ids": {2: "seq"}}
    dynamic |= {name: {2: "past"} for name in pasts}
    dynamic |= {name: {2: "total"} for name in presents}
    _export(
        decoder, trace_args, out / DECODER_FILE, opset,
        input_names=["inputs_embeds", "attention_mask", "position_ids", *pasts],
        output_names=["logits", "next_token", *presents], dynamic_axes=dynamic,
    )  # fmt: skip

    embed = _inner(model).language_model.embed_tokens.weight.detach().float().cpu().numpy()
    np.save(out / EMBEDDINGS_FILE, embed)
    processor_dir = out / PROCESSOR_DIR
    if processor_dir.exists():
        shutil.rmtree(processor_dir)
    processor.save_pretrained(processor_dir)

    tok = processor.tokenizer
    token_ids = {
        name: int(tok.convert_tokens_to_ids(token))
        for name, token in (("image_pad", "<|image_pad|>"), ("vision_start", "<|vision_start|>"),
                            ("vision_end", "<|vision_end|>"), ("im_end", "<|im_end|>"), ("endoftext", "<|endoftext|>"))
    }  # fmt: skip
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = sorted({int(e) for e in ([eos] if isinstance(eos, int) else (eos or []))} | {token_ids["im_end"]})
    prompt = example.input_ids[0].tolist()
    prefix_tokens = prompt.index(token_ids["vision_end"]) + 1
    w, h = image_size(processor)
    kv_shape_in = [1, kv_heads, "past", head_dim]
    kv_shape_out = [1, kv_heads, "total", head_dim]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "opset": opset,
        "dtype": "float32",
        "exporter": f"torch.onnx (TorchScript, dynamo=False), torch {torch.__version__}",
        "model_dir": str(loaded.path) if loaded.path is not None else None,
        "model_config_sha256": config_hash(model),
        "image_size": [w, h],
        "image_grid_thw": [int(v) for v in grid],
        "num_image_tokens": n_tokens,
        "prefix_tokens": prefix_tokens,  # the prompt up to and including <|vision_end|>
        "spatial_merge_size": int(model.config.vision_config.spatial_merge_size),
        "text": {
            "num_layers": num_layers,
            "num_kv_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_size": hidden,
            "vocab_size": vocab,
            "max_position_embeddings": int(getattr(text, "max_position_embeddings", 0) or 0),
        },
        "token_ids": token_ids,
        "eos_token_ids": eos_ids,
        "files": {
            "vision": VISION_FILE,
            "decoder": DECODER_FILE,
            "embeddings": EMBEDDINGS_FILE,
            "processor": PROCESSOR_DIR,
        },
        "vision": {
            "inputs": [_spec("pixel_values", [n_patches, patch_dim], "float32")],
            "outputs": [_spec("image_embeds", [n_tokens, hidden], "float32")],
        },
        "decoder": {
            "inputs": [
                _spec("inputs_embeds", [1, "seq", hidden], "float32"),
                _spec("attention_mask", [1, "total"], "int64"),
                _spec("position_ids", [3, 1, "seq"], "int64"),
                *[_spec(name, kv_shape_in, "float32") for name in pasts],
            ],
            "outputs": [
                _spec("logits", [1, vocab], "float32"),
                _spec("next_token", [1], "int64"),
                *[_spec(name, kv_shape_out, "float32") for name in presents],
            ],
            "past_names": pasts,
            "present_names": presents,
            "notes": "total = past + seq; logits are for the last position only; prefill = a call with past 0",
        },
        "embeddings": {"shape": list(embed.shape), "dtype": "float32"},
        "sha256": {VISION_FILE: onnx_sha256(out / VISION_FILE), DECODER_FILE: onnx_sha256(out / DECODER_FILE)},
        "export_seconds": round(time.perf_counter() - start, 2),
    }
    if image_token_count(processor) != n_tokens:
        raise RuntimeError(
            f"vision encoder gives {n_tokens} tokens, the processor expects {image_token_count(processor)}"
        )
    write_manifest(out, manifest)
    log.info("exported %s and %s to %s in %.1f s", VISION_FILE, DECODER_FILE, out, manifest["export_seconds"])
    return manifest
