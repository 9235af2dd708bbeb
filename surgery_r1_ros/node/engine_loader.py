"""Create the node's engine from its parameters: the built-in Engine, or a user class ``package.module:Class``.

A user class has the Engine's interface: ``Class(model, device=...)``, ``ask(question, image=, stamp=,
reasoning=, max_new_tokens=)`` returning an object with ``answer``, ``reasoning``, ``box`` (x1, y1, x2, y2
pixels of the image, or None) and ``coherent``; optionally ``encode(image, stamp)`` and ``close()``.
Every failure becomes an ``EngineLoadError`` with one clear line, so configure can fail cleanly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class EngineLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoadedEngine:
    engine: Any
    model: str  # what to show in diagnostics
    backend: str
    device: str
    input_errors: tuple[type[BaseException], ...]  # exceptions that mean "bad request", not "engine broken"


def load_engine(
    model_path: str,
    backend: str,
    device: str,
    *,
    max_question_chars: int | None = None,
    cache_size: int | None = None,
) -> LoadedEngine:
    model = model_path.strip() or None
    if model is not None and not Path(model).expanduser().is_dir():
        raise EngineLoadError(f"model_path {model_path!r} is not a folder (leave it empty for the built-in model)")
    dev = None if device.strip().lower() in ("", "auto") else device.strip()
    if ":" in backend:
        return _load_user_class(backend, model, dev)
    try:
        from surgery_r1_ros.engine import Engine, EngineError
    except Exception as err:
        raise EngineLoadError(f"the built-in engine cannot be imported: {type(err).__name__}: {err}") from err
    options: dict[str, Any] = {}
    if max_question_chars:
        options["max_question_chars"] = max_question_chars
    if cache_size:
        options["cache_size"] = cache_size
    try:
        engine = Engine(model, backend=backend, device=dev, **options)
    except Exception as err:
        raise EngineLoadError(f"cannot load the model with backend {backend!r}: {type(err).__name__}: {err}") from err
    return LoadedEngine(
        engine=engine,
        model=_model_name(model),
        backend=backend,
        device=str(getattr(engine.backend, "device", dev or "auto")),
        input_errors=(EngineError,),
    )


def _load_user_class(spec: str, model: str | None, device: str | None) -> LoadedEngine:
    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise EngineLoadError(
            f"backend {spec!r}: cannot import {class_name!r} from {module_name!r} ({err}); "
            "use a backend name such as 'torch' or 'package.module:ClassName' on the PYTHONPATH"
        ) from err
    try:
        engine = cls(model, device=device)
    except Exception as err:
        raise EngineLoadError(f"backend {spec!r} failed to start: {type(err).__name__}: {err}") from err
    if not callable(getattr(engine, "ask", None)):
        raise EngineLoadError(f"backend {spec!r}: {class_name} has no ask() method")
    return LoadedEngine(engine, _model_name(model), spec, device or "auto", input_errors=(ValueError,))


def _model_name(model: str | None) -> str:
    if model is None:
        return "built-in"
    return Path(model).expanduser().resolve().name
