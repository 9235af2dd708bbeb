"""The TensorRT backend: runs engines built from the ONNX export (``surgery-r1 export tensorrt``).

Same semantics as the other backends. Buffers are torch CUDA tensors whose addresses are handed to the
TensorRT execution contexts (``set_tensor_address`` + ``execute_async_v3`` on torch's current stream). The
decoder engine has two optimization profiles, each with its own execution context: ``prefill`` (image
prefix, question) and ``decode`` (one token). The image prefix is prefilled after a one-token dummy past
that the attention mask hides, so no tensor ever has a zero-length axis.

``model`` may be an engine folder (``tensorrt_manifest.json``), an export folder (engines are built into
``<export>/tensorrt`` once and cached by the ONNX hash, see ``engine.artifacts``), a model folder, a
LoadedModel or None.

Not verified on a machine with TensorRT (none could be installed where this was written): the code
follows the TensorRT 10 Python API; the onnxruntime backend, which shares the export and this file's
prompt handling, is tested.
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
from surgery_r1_ros.engine.artifacts import (
    ENGINE_SUBDIR,
    MANIFEST,
    TRT_MANIFEST,
    load_manifest,
    load_trt_manifest,
    onnx_export_for,
    tensorrt_engines_for,
)
from surgery_r1_ros.engine.decode import Step
from surgery_r1_ros.engine.rope import prefix_positions, text_positions

log = logging.getLogger(__name__)


class TensorRTNotInstalled(EngineError):
    """``import tensorrt`` failed: say how to get it."""


def import_tensorrt():
    """The ``tensorrt`` module, or a TensorRTNotInstalled error that says what to install where."""
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTNotInstalled(
            "TensorRT is not installed: pip install tensorrt on a CUDA machine (NVIDIA driver and GPU needed; "
            "tensorrt-cu12 or tensorrt-cu13 to match the CUDA of your torch), then re-run. "
            f"Without it use the onnxruntime or torch backend. ({type(err).__name__}: {err})"
        ) from err
    return tensorrt


@dataclass(frozen=True)
class TrtPrefix:
    kv: tuple[Any, ...]  # torch CUDA tensors (1, kv_heads, 1 + prefix, head_dim), never modified
    past_length: int  # dummy + prefix
    next_position: int


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}  # fmt: skip
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class _Runner:
    """One execution context of an engine, pinned to one optimization profile."""

    def __init__(self, trt, engine, profile: int, stream) -> None:
        self.trt = trt
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = stream
        if engine.num_optimization_profiles > 1:
            self.context.set_optimization_profile_async(profile, stream.cuda_stream)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        keep = []
        for name in self.inputs:
            tensor = feeds[name].contiguous()
            want = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            if tensor.dtype != want:
                tensor = tensor.to(want)
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        del keep
        return outputs


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, engine_dir: str | Path) -> None:
        import torch

        from surgery_r1_ros.model.processor import SurgeryR1Processor

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise EngineError("the tensorrt backend needs a CUDA GPU; use the onnxruntime or torch backend here")
        self.trt = trt
        self.engine_dir = Path(engine_dir)
        self.trt_manifest = load_trt_manifest(self.engine_dir)
        self.onnx_dir = Path(self.trt_manifest["onnx_dir"])
        self.manifest = load_manifest(self.onnx_dir)
        files = self.manifest["files"]
        self.processor = SurgeryR1Processor.from_pretrained(self.onnx_dir / files["processor"])
        self.device = "cuda:0"
        self.stream = torch.cuda.Stream()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engines = self.trt_manifest["engines"]
        self._engines = {
            part: runtime.deserialize_cuda_engine((self.engine_dir / engines[part]["engine"]).read_bytes())
            for part in ("vision", "decoder")
        }
        if any(e is None for e in self._engines.values()):
            raise EngineError(f"TensorRT could not load the engines in {self.engine_dir}; rebuild them")
        self.vision = _Runner(trt, self._engines["vision"], 0, self.stream)
        self.prefill_runner = _Runner(trt, self._engines["decoder"], 0, self.stream)
        self.decode_runner = _Runner(trt, self._engines["decoder"], 1, self.stream)
        self.embeddings = torch.from_numpy(np.load(self.onnx_dir / files["embeddings"])).to("cuda")
        text = self.manifest["text"]
        self.dummy = int(self.trt_manifest.get("dummy_past", 1))
        self._dummy_past = torch.zeros(1, int(text["num_kv_heads"]), self.dummy, int(text["head_dim"]), device="cuda")
        self.past_names = list(self.manifest["decoder"]["past_names"])
        self.present_names = list(self.manifest["decoder"]["present_names"])
        self.image_token_id = int(self.manifest["token_ids"]["image_pad"])
        self.grid = [int(v) for v in self.manifest["image_grid_thw"]]
        self.merge = int(self.manifest["spatial_merge_size"])
        self.max_past = int(self.trt_manifest["limits"]["max_past"])

    def _mask(self, total: int):
        import torch

        mask = torch.ones(1, total, dtype=torch.int64, device="cuda")
        mask[:, : self.dummy] = 0
        return mask

    def _run_decoder(self, runner: _Runner, embeds, positions: np.ndarray, past: Sequence[Any], past_length: int):
        import torch

        seq = embeds.shape[1]
        if past_length + seq > self.max_past + 1:
            raise EngineError(
                f"sequence of {past_length + seq} tokens exceeds the engines' profile ({self.max_past}); "
                "rebuild with larger --max-new-tokens / --max-question-tokens"
            )
        feeds = {
            "inputs_embeds": embeds,
            "attention_mask": self._mask(past_length + seq),
            "position_ids": torch.from_numpy(np.ascontiguousarray(positions.reshape(3, 1, seq))).to("cuda"),
        }
        feeds.update(zip(self.past_names, past, strict=True))
        with torch.cuda.stream(self.stream):
            out = runner(feeds)
        return out["next_token"], tuple(out[name] for name in self.present_names)

    def encode_frame(self, pixel_values, image_grid_thw, prefix_ids: Sequence[int]) -> tuple[TrtPrefix, dict]:
        import torch

        grid = [int(v) for v in np.asarray(image_grid_thw).reshape(-1)]
        if grid != self.grid:
            raise EngineError(f"image grid {grid} differs from the engines' fixed grid {self.grid}")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        pixels = torch.as_tensor(pixel_values).to("cuda", torch.float32)
        with torch.cuda.stream(self.stream):
            image_embeds = self.vision({"pixel_values": pixels})["image_embeds"]
        self.stream.synchronize()
        timings["vision_encode_ms"] = _ms(start)

        start = time.perf_counter()
        ids = torch.tensor(list(prefix_ids), dtype=torch.long, device="cuda")
        embeds = self.embeddings[ids].clone()
        embeds[ids == self.image_token_id] = image_embeds.to(embeds.dtype)
        positions, next_position = prefix_positions(prefix_ids, self.image_token_id, grid, self.merge)
        past = [self._dummy_past] * len(self.past_names)
        _, present = self._run_decoder(self.prefill_runner, embeds[None], positions, past, self.dummy)
        self.stream.synchronize()
        timings["prefix_prefill_ms"] = _ms(start)
        return TrtPrefix(present, self.dummy + len(prefix_ids), next_position), timings

    def session(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def prefill(self, frame: TrtPrefix, suffix_ids: Sequence[int], max_new_tokens: int) -> tuple[int, Step]:
        import torch

        ids = torch.tensor(list(suffix_ids), dtype=torch.long, device="cuda")
        token_t, past = self._run_decoder(self.prefill_runner, self.embeddings[ids][None],
                                          text_positions(frame.next_position, len(suffix_ids)), frame.kv,
                                          frame.past_length)  # fmt: skip
        length = frame.past_length + len(suffix_ids)
        position = frame.next_position + len(suffix_ids)

        def step(token: int) -> int:
            nonlocal token_t, past, length, position
            embed = self.embeddings[token_t.reshape(1).to(torch.long)][None]  # stays on the GPU
            token_t, past = self._run_decoder(self.decode_runner, embed, text_positions(position, 1), past, length)
            length += 1
            position += 1
            return int(token_t.reshape(-1)[0])

        return int(token_t.reshape(-1)[0]), step

    def close(self) -> None:
        self.vision = self.prefill_runner = self.decode_runner = None
        self._engines = {}


def create(
    model: Any = None,
    *,
    device: str | None = None,
    dtype: Any = None,
    engine_dir: str | Path | None = None,
    onnx_dir: str | Path | None = None,
    precision: str | None = None,
    **settings: Any,
) -> TensorRTBackend:
    """Backend factory: engine folder, export folder, model folder, LoadedModel or None (built-in)."""
    trt = import_tensorrt()
    if device is not None and not str(device).startswith("cuda"):
        raise EngineError(f"the tensorrt backend runs on CUDA only; device {device!r} is not supported")
    if engine_dir is None and isinstance(model, (str, Path)) and (Path(model) / TRT_MANIFEST).is_file():
        engine_dir = Path(model)
    if engine_dir is None:
        if isinstance(model, (str, Path)) and (Path(model) / MANIFEST).is_file() and onnx_dir is None:
            onnx_dir = Path(model)
        folder = onnx_export_for(model, onnx_dir)
        if precision is None:
            precision = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(
                str(dtype).replace("torch.", ""), "fp16"
            )
        engine_dir = tensorrt_engines_for(folder, folder / ENGINE_SUBDIR, {"precision": precision, **settings},
                                          trt.__version__)  # fmt: skip
    return TensorRTBackend(engine_dir)


__all__ = ["TensorRTBackend", "TensorRTNotInstalled", "TrtPrefix", "create", "import_tensorrt"]
