"""The inference engine: a grounded answer (label, box in camera pixels, optional reasoning) per question.

Frame-ahead encoding: the prompt puts the image before the question, so ``encode(image, stamp)`` can run
the vision encoder and prefill the image part of the prompt as soon as a frame arrives. The result is kept
in a small LRU cache keyed by the frame's stamp, and ``ask`` then pays only for the question's prefill and
the answer's decoding. Direct mode (PromptMode.GROUND) is the fast path; ``reasoning=True`` asks for a
chain of thought first (PromptMode.REASON).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np

from surgery_r1_ros.boxes import Box, Size, clip_box, round_box, scale_box
from surgery_r1_ros.coherence import check_coherence
from surgery_r1_ros.engine.backends import Backend, EngineError, create_backend
from surgery_r1_ros.model.processor import image_size as processor_image_size
from surgery_r1_ros.model.prompts import prompt_texts
from surgery_r1_ros.protocol import PromptMode, parse_output
from surgery_r1_ros.vocab import parse_question

log = logging.getLogger(__name__)

MIN_SIDE = 28  # one merged patch (14 px x 2)
MAX_SIDE = 4096
MAX_QUESTION_CHARS = 500
DEFAULT_MAX_NEW_TOKENS = {PromptMode.GROUND: 48, PromptMode.REASON: 256, PromptMode.ANSWER: 16}
VISION_END = "<|vision_end|>"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


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


@dataclass
class _Frame:
    state: Any
    size: Size  # original (width, height)
    timings: dict[str, float]


def check_image(image: Any) -> np.ndarray:
    """Validate an RGB frame: HxWx3 uint8, sides in [28, 4096]. Returns it C-contiguous."""
    if not isinstance(image, np.ndarray):
        raise EngineError(f"image must be a numpy array (H, W, 3) of uint8 RGB; got {type(image).__name__}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise EngineError(
            f"image {image.shape} is grayscale; send 3-channel RGB, e.g. cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)"
        )
    if image.ndim != 3 or image.shape[2] not in (3,):
        if image.ndim == 3 and image.shape[2] == 4:
            raise EngineError(f"image {image.shape} has 4 channels (RGBA/BGRA); drop alpha and send RGB: img[..., :3]")
        raise EngineError(f"image shape {image.shape} is not (H, W, 3); send an RGB frame of shape (H, W, 3)")
    if image.dtype != np.uint8:
        hint = "scale 16-bit to 8-bit: (img >> 8).astype(np.uint8)" if image.dtype == np.uint16 else (
            "convert to uint8 0..255: (img * 255).clip(0, 255).astype(np.uint8)" if image.dtype.kind == "f"
            else "convert to uint8 0..255"
        )  # fmt: skip
        raise EngineError(f"image dtype {image.dtype} is not uint8; {hint}")
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise EngineError(f"image {w}x{h} is too small; each side needs at least {MIN_SIDE} pixels")
    if max(h, w) > MAX_SIDE:
        raise EngineError(
            f"image {w}x{h} is too large; at most {MAX_SIDE} pixels a side (downscale first, e.g. cv2.resize)"
        )
    return np.ascontiguousarray(image)


def check_question(question: Any, max_chars: int = MAX_QUESTION_CHARS) -> str:
    """Validate a question: non-empty text, at most ``max_chars``, no chat control tokens."""
    if not isinstance(question, str):
        raise EngineError(f"question must be text; got {type(question).__name__}")
    text = question.strip()
    if not text:
        raise EngineError('question is empty; ask e.g. "Where is bipolar_forceps located?"')
    if len(text) > max_chars:
        raise EngineError(f"question has {len(text)} characters; the limit is {max_chars}; ask a shorter question")
    if "<|" in text or "|>" in text:
        raise EngineError("question must not contain the model's control tokens (<|...|>); send plain text")
    return text


def question_subject(question: str) -> str | None:
    """The instrument a question asks about (None for the organ question or a free-form question)."""
    try:
        return parse_question(question)[1]
    except ValueError:
        return None


class Engine:
    """Grounded surgical VQA on frames: ``encode`` frames as they arrive, ``ask`` questions about them.

    ``model`` is a model folder, a ``LoadedModel`` or None (the built-in model). ``cache_size`` is the
    number of encoded frames kept (least recently used dropped first). Thread-safe: calls are serialised.
    """

    def __init__(
        self,
        model: Any = None,
        backend: str = "torch",
        device: str | None = None,
        dtype: Any = None,
        *,
        cache_size: int = 4,
        max_new_tokens: dict | int | None = None,
        max_question_chars: int = MAX_QUESTION_CHARS,
        **backend_options: Any,
    ) -> None:
        if cache_size < 1:
            raise EngineError(f"cache_size must be at least 1; got {cache_size}")
        self.backend: Backend = create_backend(backend, model, device=device, dtype=dtype, **backend_options)
        self.processor = self.backend.processor
        self.cache_size = cache_size
        self.max_question_chars = max_question_chars
        self.max_new_tokens = dict(DEFAULT_MAX_NEW_TOKENS)
        if isinstance(max_new_tokens, int):
            self.max_new_tokens = dict.fromkeys(self.max_new_tokens, max_new_tokens)
        elif max_new_tokens:
            self.max_new_tokens.update({PromptMode(k): v for k, v in max_new_tokens.items()})
        self._frames: OrderedDict[Hashable, _Frame] = OrderedDict()
        self._lock = threading.RLock()
        self._auto_stamp = count()
        tok = self.processor.tokenizer
        self._tokenizer = tok
        self.stop_ids = tuple(i for i in tok.convert_tokens_to_ids(list(STOP_TOKENS)) if i is not None)
        self._prefix_ids, self._suffix_texts = self._split_prompts()

    # -- prompt layout ---------------------------------------------------------------------------------
    def _split_prompts(self) -> tuple[list[int], dict[PromptMode, tuple[str, str]]]:
        """Token ids of the shared image prefix, and each mode's text around the question."""
        marker = "\x00QUESTION\x00"
        suffixes: dict[PromptMode, tuple[str, str]] = {}
        prefix_text = None
        for mode in PromptMode:
            text = prompt_texts(self.processor, [marker], [mode])[0]
            cut = text.index(VISION_END) + len(VISION_END)
            if prefix_text is not None and text[:cut] != prefix_text:
                raise EngineError("the chat template puts different text before the image for different modes")
            prefix_text = text[:cut]
            before, _, after = text[cut:].partition(marker)
            suffixes[mode] = (before, after)
        assert prefix_text is not None
        image_token = self.processor.image_token
        n_image = self._image_tokens()
        expanded = prefix_text.replace(image_token, image_token * n_image)
        prefix_ids = self._tokenizer(expanded, add_special_tokens=False)["input_ids"]
        return prefix_ids, suffixes

    def _image_tokens(self) -> int:
        w, h = self.image_size
        ip = self.processor.image_processor
        return (w // ip.patch_size) * (h // ip.patch_size) // (ip.merge_size**2)

    def suffix_ids(self, question: str, mode: PromptMode) -> list[int]:
        before, after = self._suffix_texts[PromptMode(mode)]
        return self._tokenizer(before + question + after, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, question: str, mode: PromptMode) -> list[int]:
        """All token ids of the prompt (prefix + suffix), as the frame-ahead path feeds them."""
        return list(self._prefix_ids) + self.suffix_ids(question, mode)

    @property
    def image_size(self) -> Size:
        """(width, height) of the model's input: the pixel frame of the model's boxes."""
        return processor_image_size(self.processor)

    @property
    def cached_stamps(self) -> list[Hashable]:
        with self._lock:
            return list(self._frames)

    # -- frames --------------------------------------------------------------------------------------
    def encode(self, image: np.ndarray, stamp: Hashable | None = None) -> Hashable:
        """Encode a frame ahead of any question; returns the stamp it is cached under.

        A stamp names one frame: encoding a stamp that is already cached keeps the cached frame.
        Without a stamp the frame gets a fresh one ("auto-N").
        """
        image = check_image(image)
        with self._lock:
            if stamp is None:
                stamp = f"auto-{next(self._auto_stamp)}"
            elif stamp in self._frames:
                self._frames.move_to_end(stamp)
                return stamp
            self._frames[stamp] = self._encode(image)
            while len(self._frames) > self.cache_size:
                self._frames.popitem(last=False)
            return stamp

    def _encode(self, image: np.ndarray) -> _Frame:
        start = time.perf_counter()
        features = self.processor.image_processor(
            images=[image], input_data_format="channels_last", return_tensors="pt"
        )
        timings = {"preprocess_ms": (time.perf_counter() - start) * 1000.0}
        state, backend_timings = self.backend.encode_frame(
            features["pixel_values"], features["image_grid_thw"][0], self._prefix_ids
        )
        timings.update(backend_timings)
        h, w = image.shape[:2]
        return _Frame(state, (w, h), timings)

    def forget(self, stamp: Hashable | None = None) -> None:
        """Drop one cached frame, or all of them."""
        with self._lock:
            if stamp is None:
                self._frames.clear()
            else:
                self._frames.pop(stamp, None)

    # -- questions -----------------------------------------------------------------------------------
    def ask(
        self,
        question: str,
        image: np.ndarray | None = None,
        stamp: Hashable | None = None,
        reasoning: bool = False,
        max_new_tokens: int | None = None,
    ) -> GroundedAnswer:
        """Answer ``question`` about a frame: ``image`` (encoded now unless ``stamp`` is cached), the cached
        frame ``stamp``, or, with neither, the most recently encoded frame."""
        start = time.perf_counter()
        question = check_question(question, self.max_question_chars)
        mode = PromptMode.for_request(reasoning)
        limit = int(max_new_tokens or self.max_new_tokens[mode])
        if limit < 1:
            raise EngineError(f"max_new_tokens must be at least 1; got {limit}")
        with self._lock:
            timings: dict[str, float] = {}
            if image is not None:
                image = check_image(image)
                cached = stamp is not None and stamp in self._frames
                stamp = self.encode(image, stamp)
                frame = self._frames[stamp]
                if not cached:
                    timings.update(frame.timings)
            elif stamp is not None:
                if stamp not in self._frames:
                    raise EngineError(
                        f"no encoded frame with stamp {stamp!r} (cached: {len(self._frames)} frames); "
                        "encode(image, stamp) it first or pass the image"
                    )
                frame = self._frames[stamp]
                self._frames.move_to_end(stamp)
            else:
                if not self._frames:
                    raise EngineError("no frame has been encoded yet; pass an image or call encode(image, stamp) first")
                stamp = next(reversed(self._frames))
                frame = self._frames[stamp]
            timings.setdefault("preprocess_ms", 0.0)
            timings.setdefault("vision_encode_ms", 0.0)
            timings.setdefault("prefix_prefill_ms", 0.0)
            suffix = self.suffix_ids(question, mode)
            tokens, gen_timings = self.backend.generate(frame.state, suffix, limit, self.stop_ids)
        timings.update(gen_timings)
        text = self._tokenizer.decode(tokens, skip_special_tokens=True)
        result = self._grounded(text, question, mode, frame.size, stamp)
        n = len(tokens)
        timings["decode_ms_per_token"] = timings.get("decode_ms", 0.0) / max(n - 1, 1)
        total = (time.perf_counter() - start) * 1000.0
        timings["total_ms"] = total
        return GroundedAnswer(**{**result, "latency_ms": total, "timings": timings, "new_tokens": n})

    def _grounded(self, text: str, question: str, mode: PromptMode, size: Size, stamp: Hashable) -> dict:
        parsed = parse_output(text)
        model_size = self.image_size
        model_box: Box | None = None
        box = None
        coherent = False
        if parsed.box is not None:
            model_box = clip_box(parsed.box, model_size)
            box = round_box(clip_box(scale_box(model_box, model_size, size), size))
            coherent = True
            if parsed.reasoning:
                result = check_coherence(parsed.reasoning, model_box, model_size, question_subject(question))
                coherent = result.coherent
        return {
            "answer": parsed.answer,
            "reasoning": parsed.reasoning,
            "box": box,
            "coherent": coherent,
            "text": text,
            "mode": mode.value,
            "format_ok": parsed.format_ok(mode),
            "problems": parsed.problems,
            "stamp": stamp,
            "image_size": size,
            "model_box": model_box,
        }

    def close(self) -> None:
        with self._lock:
            self._frames.clear()
            self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_engine(model: str | Path | None = None, backend: str = "torch", device: str | None = None, **kw) -> Engine:
    """Shorthand for ``Engine(model, backend, device, **kw)``."""
    return Engine(model, backend, device, **kw)
