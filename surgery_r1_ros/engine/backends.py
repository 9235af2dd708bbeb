"""Inference backends: what runs the vision encoder, the prefill and one decode step for the Engine.

The Engine owns everything model-independent (input checks, the processor, prompt tokens, the encoded
frames, the decode loop in ``engine.decode``, output parsing, box scaling, coherence). A backend owns the
model and implements:

``encode_frame(pixel_values, image_grid_thw, prefix_ids) -> (frame_state, timings)``
    run the vision encoder and prefill the prompt prefix (everything up to and including
    <|vision_end|>); ``frame_state`` is opaque to the Engine, which keeps it per stamp;
``prefill(frame_state, suffix_ids, max_new_tokens) -> (first_token, step)``
    prefill the question suffix after the prefix and return the greedy first token and a one-token
    ``step(token) -> next_token``; ``frame_state`` must stay unchanged so that it can be asked again;
``session()``
    a context manager the Engine enters around every call above (torch: threads, inference mode);
``close()``, and the attributes ``processor`` (a ``SurgeryR1Processor``), ``name`` and ``device``.

The backends are the three below, named by ``Engine(model, backend=...)``; the Engine also takes a
backend object directly (tests, experiments). A whole different engine plugs in as a class through
``open_engine("package.module:Class")`` instead. Use ``engine.rope`` for the M-RoPE positions.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from surgery_r1_ros.engine.api import EngineError
from surgery_r1_ros.engine.decode import Step


@runtime_checkable
class Backend(Protocol):
    name: str
    processor: Any
    device: str

    def encode_frame(self, pixel_values: Any, image_grid_thw: Any, prefix_ids: Sequence[int]) -> tuple[Any, dict]: ...

    def prefill(self, frame_state: Any, suffix_ids: Sequence[int], max_new_tokens: int) -> tuple[int, Step]: ...

    def session(self) -> AbstractContextManager[Any]: ...

    def close(self) -> None: ...


# name -> "module:factory", imported on first use (keeps heavy imports lazy).
BACKENDS: dict[str, str] = {
    "torch": "surgery_r1_ros.engine.torch_backend:create",
    "onnxruntime": "surgery_r1_ros.engine.onnxruntime_backend:create",
    "tensorrt": "surgery_r1_ros.engine.tensorrt_backend:create",
}


AUTO = "auto"
# Below this many parameters a model runs on one CPU thread by default (torch and onnxruntime backends): its
# matrices are too small to gain from splitting, and on a busy machine waiting threads cost far more (measured
# on 2 loaded cores: torch 5-10x slower with 2 threads; onnxruntime ~800 ms vs 60-180 ms per 20-token ask).
SMALL_MODEL_PARAMETERS = 50_000_000


def available_backends() -> list[str]:
    return sorted(BACKENDS)


def default_backend(device: str | None) -> str:
    """The fastest backend measured for ``device`` (None: CUDA when available): onnxruntime on CPU (twice as
    fast as torch with the built-in model, benchmarks/results/bench_cpu.json), torch on CUDA (static KV
    cache and CUDA graphs; the tensorrt backend has not been verified on a GPU)."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "torch" if str(device).startswith("cuda") else "onnxruntime"


def create_backend(name: str, model: Any = None, **options: Any) -> Backend:
    """Instantiate backend ``name`` for ``model`` (folder, LoadedModel or None for the built-in model)."""
    if name not in BACKENDS:
        raise EngineError(
            f"unknown backend {name!r}; available backends: {', '.join(available_backends())}, "
            "or 'package.module:Class' for an engine class of your own"
        )
    module_name, _, attr = BACKENDS[name].partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as err:
        raise EngineError(f"backend {name!r} is not usable here: {err}") from err
    return factory(model, **options)
