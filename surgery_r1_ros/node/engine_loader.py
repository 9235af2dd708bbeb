"""The node's engine from its parameters, through ``engine.open_engine`` (backend name or ``package.module:Class``).

Every failure becomes an ``EngineLoadError`` with one clear line, so configure can fail cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery_r1_ros.engine.api import EngineProtocol, open_engine


class EngineLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoadedEngine:
    engine: EngineProtocol
    model: str  # what to show in diagnostics
    backend: str  # the backend in use ("auto" resolved) or the user class
    device: str


def load_engine(model_path: str, backend: str, device: str, *, max_question_length: int | None = None) -> LoadedEngine:
    """Open the engine named by the node's ``model_path``, ``backend`` and ``device`` parameters."""
    model = model_path.strip() or None
    if model is not None and not Path(model).expanduser().is_dir():
        raise EngineLoadError(f"model_path {model_path!r} is not a folder (leave it empty for the built-in model)")
    dev = None if device.strip().lower() in ("", "auto") else device.strip()
    options = {} if max_question_length is None else {"max_question_length": max_question_length}
    try:
        engine = open_engine(model, backend, dev, **options)
    except Exception as err:
        raise EngineLoadError(f"backend {backend!r} failed to start: {type(err).__name__}: {err}") from err
    if ":" in backend:  # open_engine's rule: anything else is the built-in Engine
        return LoadedEngine(engine, _model_name(model), backend, dev or "auto")
    return LoadedEngine(engine, _model_name(model), engine.backend.name, engine.device)


def _model_name(model: str | None) -> str:
    if model is None:
        return "built-in"
    return Path(model).expanduser().resolve().name
