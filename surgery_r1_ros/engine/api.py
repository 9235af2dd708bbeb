"""The engine contract: what the node, the command line, the benchmarks and a user's own engine class share.

- ``EngineProtocol``: ``encode(image, stamp)``, ``ask(question, ...)`` and ``close()``. The built-in
  ``Engine`` implements it; so does any class named to ``open_engine`` as ``"package.module:Class"``.
  The engine owns its encoded frames: callers name frames by stamp and may always pass the image again
  (an engine that still holds the stamp does not encode it twice).
- ``GroundedAnswer``: the reply to one question.
- ``InputError``: a request the engine cannot serve (bad image, bad question, unknown stamp), with a
  message that says what to send instead; ``EngineError``: an engine that cannot be opened as asked.
- Streaming: ``ask(..., on_token=callback, cancelled=check)`` calls ``callback(Progress)`` after every
  generated token and ``check()`` before every decode step; when it returns true, ``ask`` raises
  ``Cancelled`` (with the progress so far) instead of generating the next token.

This module is light (no torch, no model): user engines and the node import it freely.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from surgery_r1_ros.protocol import PromptMode

log = logging.getLogger(__name__)

MIN_SIDE = 28  # one merged patch (14 px x 2)
MAX_SIDE = 4096
MAX_QUESTION_LENGTH = 500  # characters; the node's max_question_length parameter has the same default


class InputError(ValueError):
    """A request the engine cannot serve (bad image, bad question, unknown stamp); says what to send instead."""


class EngineError(RuntimeError):
    """An engine that cannot be opened or run as configured (unknown backend, missing runtime, bad artifacts)."""


@dataclass(frozen=True)
class Progress:
    """A completion while it is generated: the text so far and how many tokens it took."""

    text: str
    new_tokens: int

    @property
    def reasoning(self) -> str:
        """The ``<think>`` text so far ('' before ``<think>``); a closing tag still being generated is hidden."""
        start = self.text.find("<think>")
        if start < 0:
            return ""
        body = self.text[start + len("<think>") :]
        end = body.find("</think>")
        if end >= 0:
            return body[:end].strip()
        cut = body.rfind("<")
        if cut >= 0 and "</think>".startswith(body[cut:]):
            body = body[:cut]
        return body.strip()


class Cancelled(Exception):
    """``ask`` stopped because its ``cancelled()`` check returned true; ``progress`` is what was generated."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(f"cancelled after {progress.new_tokens} generated tokens")
        self.progress = progress


TokenCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class GroundedAnswer:
    """The engine's reply to one question about one frame."""

    answer: str | None  # vocabulary label (or the model's raw words when outside the vocabulary)
    reasoning: str | None  # the <think> text (reasoning mode only)
    box: tuple[int, int, int, int] | None  # x1, y1, x2, y2 in pixels of the ORIGINAL image
    coherent: bool  # a box exists and the reasoning's position claims agree with it
    latency_ms: float  # wall time of the ask call
    timings: dict[str, float] = field(default_factory=dict)
    text: str = ""  # the raw completion
    mode: str = PromptMode.GROUND.value
    format_ok: bool = False  # every part the mode asks for was present and readable
    problems: tuple[str, ...] = ()
    stamp: Any = None
    image_size: tuple[int, int] | None = None  # (width, height) of the original image
    model_box: tuple[float, float, float, float] | None = None  # box in the model's input pixels
    new_tokens: int = 0
    encode_ms: float = 0.0  # time this ask spent encoding its frame (0 when the frame was encoded before)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["box"] = list(self.box) if self.box is not None else None
        out["model_box"] = list(self.model_box) if self.model_box is not None else None
        out["image_size"] = list(self.image_size) if self.image_size is not None else None
        out["problems"] = list(self.problems)
        stamp = self.stamp
        out["stamp"] = stamp if isinstance(stamp, (int, float, str)) or stamp is None else repr(stamp)
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


@runtime_checkable
class EngineProtocol(Protocol):
    """What the node and the tools call. A user class is built as ``Class(model, device=..., **options)``."""

    def encode(self, image: np.ndarray, stamp: Hashable | None = None) -> Hashable:
        """Encode an RGB frame ahead of questions; returns the stamp it is known by."""
        ...

    def ask(
        self,
        question: str,
        image: np.ndarray | None = None,
        stamp: Hashable | None = None,
        reasoning: bool = False,
        max_new_tokens: int | None = None,
        *,
        on_token: TokenCallback | None = None,
        cancelled: CancelCheck | None = None,
    ) -> GroundedAnswer:
        """Answer ``question`` about ``image`` / the frame ``stamp``; raises InputError or Cancelled."""
        ...

    def close(self) -> None: ...


# -- input checks (one implementation, for every engine) ------------------------------------------------


def check_rgb(image: Any) -> np.ndarray:
    """Validate an RGB frame: HxWx3 uint8, sides in [28, 4096]. Returns it C-contiguous."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array (H, W, 3) of uint8 RGB; got {type(image).__name__}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise InputError(
            f"image {image.shape} is grayscale; send 3-channel RGB, e.g. cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        if image.ndim == 3 and image.shape[2] == 4:
            raise InputError(f"image {image.shape} has 4 channels (RGBA/BGRA); drop alpha and send RGB: img[..., :3]")
        raise InputError(f"image shape {image.shape} is not (H, W, 3); send an RGB frame of shape (H, W, 3)")
    if image.dtype != np.uint8:
        hint = "scale 16-bit to 8-bit: (img >> 8).astype(np.uint8)" if image.dtype == np.uint16 else (
            "convert to uint8 0..255: (img * 255).clip(0, 255).astype(np.uint8)" if image.dtype.kind == "f"
            else "convert to uint8 0..255"
        )  # fmt: skip
        raise InputError(f"image dtype {image.dtype} is not uint8; {hint}")
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise InputError(f"image {w}x{h} is too small; each side needs at least {MIN_SIDE} pixels")
    if max(h, w) > MAX_SIDE:
        raise InputError(
            f"image {w}x{h} is too large; at most {MAX_SIDE} pixels a side (downscale first, e.g. cv2.resize)"
        )
    return np.ascontiguousarray(image)


def check_question(question: Any, max_length: int = MAX_QUESTION_LENGTH) -> str:
    """Validate a question: non-empty text, at most ``max_length`` characters, no chat control tokens."""
    if not isinstance(question, str):
        raise InputError(f"question must be text; got {type(question).__name__}")
    text = question.strip()
    if not text:
        raise InputError('the question is empty; ask e.g. "Where is bipolar_forceps located?"')
    if len(text) > max_length:
        raise InputError(
            f"the question has {len(text)} characters; the limit is {max_length} (max_question_length); "
            "ask a shorter question"
        )
    if "<|" in text or "|>" in text:
        raise InputError("the question must not contain the model's control tokens (<|...|>); send plain text")
    return text


# -- opening an engine ------------------------------------------------------------------------------------


def open_engine(model: Any = None, backend: str = "torch", device: str | None = None, **options: Any) -> EngineProtocol:
    """The built-in engine on ``backend`` ("torch", "onnxruntime", "tensorrt"), or a user engine class.

    ``backend="auto"``: the fastest measured backend for the device (``backends.default_backend``:
    onnxruntime on CPU, whose ONNX export is made once and cached, torch on CUDA), torch if that fails.

    ``backend="package.module:Class"`` builds ``Class(model, device=device, **options)``; the class must have
    ``encode``, ``ask`` and ``close`` (``EngineProtocol``). ``model`` is a model folder, an export folder,
    a ``LoadedModel`` or None (the built-in model). Raises EngineError with one line saying what is wrong.
    """
    if ":" not in backend:
        from surgery_r1_ros.engine.backends import AUTO, default_backend
        from surgery_r1_ros.engine.engine import Engine

        if backend != AUTO:
            return Engine(model, backend, device, **options)
        chosen = default_backend(device)
        if chosen != "torch":
            try:
                return Engine(model, chosen, device, **options)
            except Exception as err:  # e.g. a model the exporter cannot handle: torch still runs it
                log.warning("backend auto: %s is not usable for this model (%s: %s); using torch",
                            chosen, type(err).__name__, err)  # fmt: skip
        return Engine(model, "torch", device, **options)
    module_name, _, class_name = backend.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise EngineError(
            f"engine {backend!r}: cannot import {class_name!r} from {module_name!r} ({err}); use a backend name "
            "(torch, onnxruntime, tensorrt) or 'package.module:ClassName' importable from the PYTHONPATH"
        ) from err
    missing = [name for name in ("encode", "ask", "close") if not callable(getattr(cls, name, None))]
    if missing:
        raise EngineError(f"engine {backend!r}: {class_name} lacks {', '.join(missing)} (see EngineProtocol)")
    return cls(model, device=device, **options)


def describe_engine(engine: Any, backend: str, device: str | None) -> tuple[str, str]:
    """(backend, device) to report for an engine ``open_engine`` made: the built-in engine's resolved ones
    ("auto" made concrete), a user class's name and the device it was given."""
    if ":" in backend:
        return backend, device or "auto"
    return engine.backend.name, engine.device


__all__ = [
    "MAX_QUESTION_LENGTH",
    "CancelCheck",
    "Cancelled",
    "EngineError",
    "EngineProtocol",
    "GroundedAnswer",
    "InputError",
    "Progress",
    "TokenCallback",
    "check_question",
    "check_rgb",
    "describe_engine",
    "open_engine",
]
