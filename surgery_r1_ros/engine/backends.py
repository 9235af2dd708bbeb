"""Inference backends: what runs the vision encoder, the prefill and the decoding for the Engine.

The Engine owns everything model-independent (input checks, the processor, prompt tokens, the frame
cache, output parsing, box scaling, coherence). A backend owns the model and implements two calls:

``encode_frame(pixel_values, image_grid_thw, prefix_ids) -> (frame_state, timings)``
    run the vision encoder and prefill the prompt prefix (everything up to and including
    <|vision_end|>); ``frame_state`` is opaque to the Engine, which keeps it in its LRU cache;
``generate(frame_state, suffix_ids, max_new_tokens, stop_ids) -> (new_token_ids, timings)``
    prefill the question suffix after the prefix and decode greedily until a stop id (kept in the
    output) or ``max_new_tokens``; it must leave ``frame_state`` unchanged so that it can be asked again.

Backends also expose ``processor`` (a ``SurgeryR1Processor``), ``name``, ``device`` (str) and
``close()``. Register a new one with ``register_backend(name, "module:factory")``; the factory is called
as ``factory(model, device=..., dtype=..., **options)`` where ``model`` is a model folder, a
``LoadedModel`` or None (the built-in model). Use ``engine.rope`` for the M-RoPE positions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable


class EngineError(ValueError):
    """A request the engine cannot serve (bad image, bad question, unknown backend), saying what to send instead."""


@runtime_checkable
class Backend(Protocol):
    name: str
    processor: Any
    device: str

    def encode_frame(self, pixel_values: Any, image_grid_thw: Any, prefix_ids: Sequence[int]) -> tuple[Any, dict]: ...

    def generate(
        self, frame_state: Any, suffix_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int]
    ) -> tuple[list[int], dict]: ...

    def close(self) -> None: ...


# name -> factory, or "module:function" imported on first use (keeps heavy imports lazy).
_REGISTRY: dict[str, Callable[..., Backend] | str] = {
    "torch": "surgery_r1_ros.engine.torch_backend:create",
    "onnxruntime": "surgery_r1_ros.engine.onnxruntime_backend:create",
    "tensorrt": "surgery_r1_ros.engine.tensorrt_backend:create",
}


def register_backend(name: str, factory: Callable[..., Backend] | str) -> None:
    """Add (or replace) a backend: a factory, or the import path ``"package.module:function"`` of one."""
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, model: Any = None, **options: Any) -> Backend:
    """Instantiate backend ``name`` for ``model`` (folder, LoadedModel or None for the built-in model)."""
    if name not in _REGISTRY:
        raise EngineError(f"unknown backend {name!r}; available backends: {', '.join(available_backends())}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except ImportError as err:
            raise EngineError(f"backend {name!r} is not usable here: {err}") from err
    return factory(model, **options)
