"""The ONNX Runtime backend: runs the ONNX export (vision encoder + text decoder with past key/values).

Same semantics as the torch backend. ``encode_frame`` runs ``vision.onnx`` and prefills the prompt prefix
(past length 0) and keeps the prefix's present key/values as the frame state; ``prefill`` runs the
question suffix on top of them and returns a one-token step for ``engine.decode`` that feeds each call's
present key/values back as the next call's past. Key/values stay ``OrtValue``s on the session's device (I/O
binding), so on CUDA only the 8-byte ``next_token`` crosses to the host per step.

On CPU a small model runs on one thread unless ``threads`` says otherwise (``SMALL_MODEL_PARAMETERS``).
Execution providers are chosen from ``onnxruntime.get_available_providers()`` in the order TensorRT, CUDA,
CPU; ``providers=[...]`` (or a comma-separated string) or ``device="cpu"|"cuda"|"tensorrt"`` overrides.
``model`` may be an export folder (with ``export_manifest.json``), a model folder (exported once and cached,
see ``engine.artifacts``) or a LoadedModel / None (the built-in model).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surgery_r1_ros.engine.api import EngineError
from surgery_r1_ros.engine.artifacts import MANIFEST, load_manifest, onnx_export_for
from surgery_r1_ros.engine.backends import SMALL_MODEL_PARAMETERS
from surgery_r1_ros.engine.decode import Step
from surgery_r1_ros.engine.rope import prefix_positions, text_positions

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
DEVICE_PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as err:  # pragma: no cover - onnxruntime is a core requirement
        raise EngineError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from err
    return onnxruntime


def choose_providers(providers: Sequence[str] | str | None = None, device: str | None = None,
                     available: Sequence[str] | None = None) -> list[str]:  # fmt: skip
    """Execution providers to use: explicit ones (checked), a device's, or the preferred available ones."""
    if available is None:
        available = _import_ort().get_available_providers()
    available = list(available)
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    if providers:
        missing = [p for p in providers if p not in available]
        if missing:
            raise EngineError(
                f"onnxruntime execution provider(s) {missing} are not available here; available: {available}"
            )
        return list(providers)
    if device is not None:
        kind = str(device).split(":")[0].lower()
        if kind not in DEVICE_PROVIDERS:
            raise EngineError(f"device {device!r} is not one of {sorted(DEVICE_PROVIDERS)} for the onnxruntime backend")
        wanted = DEVICE_PROVIDERS[kind]
        if wanted[0] not in available:
            raise EngineError(
                f"device {device!r} needs {wanted[0]}, which this onnxruntime does not have (available: {available}); "
                "install onnxruntime-gpu on a CUDA machine, or use device 'cpu'"
            )
        return [p for p in wanted if p in available]
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or available[:1]


@dataclass(frozen=True)
class OrtPrefix:
    """A prefilled frame prefix: present key/values (OrtValues, never modified) and the next position."""

    kv: tuple[Any, ...]
    prefix_length: int
    next_position: int


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, *, providers: Sequence[str] | str | None = None,
                 device: str | None = None, threads: int | None = None) -> None:  # fmt: skip
        from surgery_r1_ros.model.processor import SurgeryR1Processor

        ort = _import_ort()
        self.onnx_dir = Path(onnx_dir)
        self.manifest = load_manifest(self.onnx_dir)
        files = self.manifest["files"]
        self.processor = SurgeryR1Processor.from_pretrained(self.onnx_dir / files["processor"])
        self.providers = choose_providers(providers, device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        if threads is None and on_cpu and self._parameters() < SMALL_MODEL_PARAMETERS:
            threads = 1  # see SMALL_MODEL_PARAMETERS
        if threads:
            options.intra_op_num_threads = int(threads)
        provider_args = [self._provider_options(p) for p in self.providers]
        self.vision = ort.InferenceSession(
            str(self.onnx_dir / files["vision"]), options, providers=self.providers, provider_options=provider_args
        )
        self.decoder = ort.InferenceSession(
            str(self.onnx_dir / files["decoder"]), options, providers=self.providers, provider_options=provider_args
        )
        self.active_providers = self.decoder.get_providers()
        on_gpu = self.active_providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        self._kv_device = "cuda" if on_gpu else "cpu"
        self.device = "cuda:0" if on_gpu else "cpu"
        self.embeddings = np.load(self.onnx_dir / files["embeddings"], mmap_mode="r")
        text = self.manifest["text"]
        self.num_layers = int(text["num_layers"])
        self._empty_past = np.zeros((1, int(text["num_kv_heads"]), 0, int(text["head_dim"])), dtype=np.float32)
        self.past_names = list(self.manifest["decoder"]["past_names"])
        self.present_names = list(self.manifest["decoder"]["present_names"])
        self.image_token_id = int(self.manifest["token_ids"]["image_pad"])
        self.grid = [int(v) for v in self.manifest["image_grid_thw"]]
        self.merge = int(self.manifest["spatial_merge_size"])
        log.info("onnxruntime backend on %s from %s", ", ".join(self.active_providers), self.onnx_dir)

    def _parameters(self) -> int:
        """About how many parameters the graphs hold: the float32 ONNX files' bytes (weights included) / 4."""
        skip = {MANIFEST, self.manifest["files"]["embeddings"]}
        return sum(p.stat().st_size for p in self.onnx_dir.iterdir() if p.is_file() and p.name not in skip) // 4

    def _provider_options(self, provider: str) -> dict:
        if provider == "TensorrtExecutionProvider":
            cache = self.onnx_dir / "ort_trt_cache"
            return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache), "trt_fp16_enable": "True"}
        return {}

    # -- decoder call ------------------------------------------------------------------------------
    def _decode(self, embeds: np.ndarray, positions: np.ndarray, past: Sequence[Any] | None,
                past_length: int) -> tuple[int, np.ndarray | None, tuple[Any, ...]]:  # fmt: skip
        """One decoder call; returns (greedy token, logits if on the host, present key/values as OrtValues)."""
        io = self.decoder.io_binding()
        seq = embeds.shape[1]
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        io.bind_cpu_input("attention_mask", np.ones((1, past_length + seq), dtype=np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(positions.reshape(3, 1, seq), dtype=np.int64))
        for i, name in enumerate(self.past_names):
            if past is None:
                io.bind_cpu_input(name, self._empty_past)
            else:
                io.bind_ortvalue_input(name, past[i])
        io.bind_output("logits", self._kv_device)
        io.bind_output("next_token", "cpu")
        for name in self.present_names:
            io.bind_output(name, self._kv_device)
        self.decoder.run_with_iobinding(io)
        outputs = io.get_outputs()
        token = int(outputs[1].numpy().reshape(-1)[0])
        logits = outputs[0].numpy() if self._kv_device == "cpu" else None
        return token, logits, tuple(outputs[2:])

    # -- frame prefix ------------------------------------------------------------------------------
    def encode_frame(self, pixel_values, image_grid_thw, prefix_ids: Sequence[int]) -> tuple[OrtPrefix, dict]:
        grid = [int(v) for v in np.asarray(image_grid_thw).reshape(-1)]
        if grid != self.grid:
            raise EngineError(
                f"image grid {grid} differs from the exported fixed grid {self.grid}; "
                f"the ONNX export is for {self.manifest['image_size']} (w, h) images"
            )
        timings: dict[str, float] = {}
        start = time.perf_counter()
        pixels = pixel_values.detach().cpu().numpy() if hasattr(pixel_values, "detach") else np.asarray(pixel_values)
        image_embeds = self.vision.run(["image_embeds"], {"pixel_values": pixels.astype(np.float32, copy=False)})[0]
        timings["vision_encode_ms"] = _ms(start)

        start = time.perf_counter()
        ids = np.asarray(list(prefix_ids), dtype=np.int64)
        embeds = np.array(self.embeddings[ids], dtype=np.float32)
        embeds[ids == self.image_token_id] = image_embeds
        positions, next_position = prefix_positions(ids, self.image_token_id, grid, self.merge)
        _, _, present = self._decode(embeds[None], positions, None, 0)
        timings["prefix_prefill_ms"] = _ms(start)
        return OrtPrefix(present, len(ids), next_position), timings

    # -- question and answer -----------------------------------------------------------------------
    def session(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def prefill(self, frame: OrtPrefix, suffix_ids: Sequence[int], max_new_tokens: int) -> tuple[int, Step]:
        ids = np.asarray(list(suffix_ids), dtype=np.int64)
        embeds = np.array(self.embeddings[ids], dtype=np.float32)[None]
        first, _, past = self._decode(embeds, text_positions(frame.next_position, len(ids)), frame.kv,
                                      frame.prefix_length)  # fmt: skip
        length = frame.prefix_length + len(ids)
        position = frame.next_position + len(ids)

        def step(token: int) -> int:
            nonlocal past, length, position
            embed = np.array(self.embeddings[[token]], dtype=np.float32)[None]
            token, _, past = self._decode(embed, text_positions(position, 1), past, length)
            length += 1
            position += 1
            return token

        return first, step

    def logits(self, frame: OrtPrefix, suffix_ids: Sequence[int], continuation: Sequence[int]) -> list[np.ndarray]:
        """Last-position logits after the suffix and after each continuation token (parity checks; CPU only)."""
        ids = np.asarray(list(suffix_ids), dtype=np.int64)
        embeds = np.array(self.embeddings[ids], dtype=np.float32)[None]
        _, logits, past = self._decode(embeds, text_positions(frame.next_position, len(ids)), frame.kv,
                                       frame.prefix_length)  # fmt: skip
        out = [logits]
        length, position = frame.prefix_length + len(ids), frame.next_position + len(ids)
        for token in continuation:
            embed = np.array(self.embeddings[[int(token)]], dtype=np.float32)[None]
            _, logits, past = self._decode(embed, text_positions(position, 1), past, length)
            out.append(logits)
            length += 1
            position += 1
        if any(item is None for item in out):
            raise EngineError("logits are only returned to the host on the CPU execution provider")
        return out

    def close(self) -> None:
        self.vision = None
        self.decoder = None


def create(model: Any = None, *, device: str | None = None, dtype: Any = None, onnx_dir: str | Path | None = None,
           providers: Sequence[str] | str | None = None, threads: int | None = None) -> OnnxRuntimeBackend:  # fmt: skip
    """Backend factory: ``model`` is an export folder, a model folder, a LoadedModel or None (built-in)."""
    if dtype is not None and str(dtype).replace("torch.", "") not in ("float32", "auto"):
        log.info("onnxruntime backend: the export is float32; dtype %s is not applied", dtype)
    return OnnxRuntimeBackend(onnx_export_for(model, onnx_dir), providers=providers, device=device, threads=threads)


__all__ = ["PREFERRED_PROVIDERS", "OnnxRuntimeBackend", "OrtPrefix", "choose_providers", "create"]
