"""The node's engine from its parameters, through ``engine.open_engine`` (backend name or ``package.module:Class``),
in the node's process or in its own (``engine.process.ProcessEngine``, the default).

Every failure becomes an ``EngineLoadError`` with one clear line, so configure can fail cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery_r1_ros.engine.api import EngineError, EngineProtocol, describe_engine, open_engine


class EngineLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoadedEngine:
    engine: EngineProtocol
    model: str  # what to show in diagnostics
    backend: str  # the backend in use ("auto" resolved) or the user class
    device: str


def load_engine(model_path: str, backend: str, device: str, *, max_question_length: int | None = None,
                own_process: bool = False) -> LoadedEngine:  # fmt: skip
    """Open the engine named by the node's ``model_path``, ``backend``, ``device`` and ``engine_process``."""
    model = model_path.strip() or None
    if model is not None and not Path(model).expanduser().is_dir():
        raise EngineLoadError(f"model_path {model_path!r} is not a folder (leave it empty for the built-in model)")
    dev = None if device.strip().lower() in ("", "auto") else device.strip()
    options = {} if max_question_length is None else {"max_question_length": max_question_length}
    try:
        if own_process:
            from surgery_r1_ros.engine.process import ProcessEngine

            engine = ProcessEngine(model, backend, dev, **options)
            return LoadedEngine(engine, _model_name(model), engine.backend_name, engine.device)
        engine = open_engine(model, backend, dev, **options)
    except EngineError as err:  # says what is wrong already
        raise EngineLoadError(f"backend {backend!r} failed to start: {err}") from err
    except Exception as err:
        raise EngineLoadError(f"backend {backend!r} failed to start: {type(err).__name__}: {err}") from err
    return LoadedEngine(engine, _model_name(model), *describe_engine(engine, backend, dev))


def _model_name(model: str | None) -> str:
    if model is None:
        return "built-in"
    return Path(model).expanduser().resolve().name
