"""The built-in inference engine: a grounded answer (label, box in camera pixels, optional reasoning) per question.

Frame-ahead encoding: the prompt puts the image before the question, so ``encode(image, stamp)`` can run
the vision encoder and prefill the image part of the prompt as soon as a frame arrives. The engine keeps
the result in a small LRU cache keyed by the frame's stamp (the engine alone knows what it holds), and
``ask`` then pays only for the question's prefill and the answer's decoding. Direct mode
(PromptMode.GROUND) is the fast path; ``reasoning=True`` asks for a chain of thought first
(PromptMode.REASON). Implements ``api.EngineProtocol``, streaming and cancel included.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from itertools import count
from typing import Any

import numpy as np

from surgery_r1_ros.boxes import Size
from surgery_r1_ros.engine.api import (
    MAX_QUESTION_LENGTH,
    CancelCheck,
    Cancelled,
    EngineError,
    GroundedAnswer,
    InputError,
    Progress,
    TokenCallback,
    check_question,
    check_rgb,
)
from surgery_r1_ros.engine.backends import Backend, create_backend
from surgery_r1_ros.engine.decode import generate
from surgery_r1_ros.grounding import ground
from surgery_r1_ros.model.processor import PATCH_SIZE, PixelValues
from surgery_r1_ros.model.processor import image_size as processor_image_size
from surgery_r1_ros.model.prompts import prompt_texts
from surgery_r1_ros.protocol import PromptMode
from surgery_r1_ros.vocab import parse_question

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = {PromptMode.GROUND: 48, PromptMode.REASON: 256, PromptMode.ANSWER: 16}
VISION_END = "<|vision_end|>"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class _Encoded:
    """One cached frame: the backend's prefilled prefix, the original size and what encoding it cost."""

    state: Any
    size: Size  # original (width, height)
    timings: dict[str, float]

    @property
    def encode_ms(self) -> float:
        return sum(self.timings.get(k, 0.0) for k in ("preprocess_ms", "vision_encode_ms", "prefix_prefill_ms"))


def question_subject(question: str) -> str | None:
    """The instrument a question asks about (None for the organ question or a free-form question)."""
    try:
        return parse_question(question)[1]
    except ValueError:
        return None


class Engine:
    """Grounded surgical VQA on frames: ``encode`` frames as they arrive, ``ask`` questions about them.

    ``model`` is a model folder, an export folder, a ``LoadedModel`` or None (the built-in model);
    ``backend`` a backend name ("torch", "onnxruntime", "tensorrt") or a backend object. ``cache_size`` is
    the number of encoded frames kept (least recently used dropped first). Thread-safe: calls are serialised.
    """

    def __init__(
        self,
        model: Any = None,
        backend: str | Backend = "torch",
        device: str | None = None,
        dtype: Any = None,
        *,
        cache_size: int = 4,
        max_new_tokens: dict | int | None = None,
        max_question_length: int = MAX_QUESTION_LENGTH,
        **backend_options: Any,
    ) -> None:
        if cache_size < 1:
            raise EngineError(f"cache_size must be at least 1; got {cache_size}")
        if isinstance(backend, str):
            backend = create_backend(backend, model, device=device, dtype=dtype, **backend_options)
        self.backend: Backend = backend
        self.processor = self.backend.processor
        self._pixel_values = PixelValues(self.processor, reuse_buffers=True)  # used under the lock only
        self.cache_size = cache_size
        self.max_question_length = max_question_length
        self.max_new_tokens = dict(DEFAULT_MAX_NEW_TOKENS)
        if isinstance(max_new_tokens, int):
            self.max_new_tokens = dict.fromkeys(self.max_new_tokens, max_new_tokens)
        elif max_new_tokens:
            self.max_new_tokens.update({PromptMode(k): v for k, v in max_new_tokens.items()})
        self._frames: OrderedDict[Hashable, _Encoded] = OrderedDict()
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
    def device(self) -> str:
        return str(self.backend.device)

    @property
    def cached_stamps(self) -> list[Hashable]:
        with self._lock:
            return list(self._frames)

    def frame_state(self, stamp: Hashable) -> Any:
        """The backend's prefilled prefix of an encoded frame (parity checks and tests)."""
        with self._lock:
            return self._frames[stamp].state

    # -- frames --------------------------------------------------------------------------------------
    def encode(self, image: np.ndarray, stamp: Hashable | None = None) -> Hashable:
        """Encode a frame ahead of any question; returns the stamp it is cached under.

        A stamp names one frame: encoding a stamp that is already cached keeps the cached frame.
        Without a stamp the frame gets a fresh one ("auto-N").
        """
        image = check_rgb(image)
        with self._lock:
            return self._encode(image, stamp)[0]

    def _encode(self, image: np.ndarray, stamp: Hashable | None) -> tuple[Hashable, _Encoded, bool]:
        """(stamp, cached frame, whether it was encoded now); the lock is held."""
        if stamp is None:
            stamp = f"auto-{next(self._auto_stamp)}"
        elif stamp in self._frames:
            self._frames.move_to_end(stamp)
            return stamp, self._frames[stamp], False
        start = time.perf_counter()
        pixel_values = self._pixel_values(image)  # numpy, equal to the processor's; valid until the next frame
        timings = {"preprocess_ms": (time.perf_counter() - start) * 1000.0}
        w, h = self.image_size
        grid = np.array([1, h // PATCH_SIZE, w // PATCH_SIZE])
        with self.backend.session():
            state, backend_timings = self.backend.encode_frame(pixel_values, grid, self._prefix_ids)
        timings.update(backend_timings)
        h, w = image.shape[:2]
        frame = self._frames[stamp] = _Encoded(state, (w, h), timings)
        while len(self._frames) > self.cache_size:
            self._frames.popitem(last=False)
        return stamp, frame, True

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
        *,
        on_token: TokenCallback | None = None,
        cancelled: CancelCheck | None = None,
    ) -> GroundedAnswer:
        """Answer ``question`` about a frame: ``image`` (encoded now unless ``stamp`` is cached), the cached
        frame ``stamp``, or, with neither, the most recently encoded frame.

        ``on_token(Progress)`` follows the generation token by token; ``cancelled()`` is asked before every
        decode step and, once true, ends the ask with ``Cancelled``.
        """
        start = time.perf_counter()
        question = check_question(question, self.max_question_length)
        mode = PromptMode.for_request(reasoning)
        limit = int(max_new_tokens or self.max_new_tokens[mode])
        if limit < 1:
            raise InputError(f"max_new_tokens must be at least 1; got {limit}")
        if image is not None:
            image = check_rgb(image)
        with self._lock:
            stamp, frame, encoded_now = self._frame_for(image, stamp)
            timings = dict(frame.timings) if encoded_now else {}
            for key in ("preprocess_ms", "vision_encode_ms", "prefix_prefill_ms"):
                timings.setdefault(key, 0.0)
            progress = None if on_token is None else self._progress_callback(on_token)
            gen = generate(self.backend, frame.state, self.suffix_ids(question, mode), limit, self.stop_ids,
                           on_token=progress, cancelled=cancelled)  # fmt: skip
        text = self._tokenizer.decode(gen.tokens, skip_special_tokens=True)
        if gen.cancelled:
            raise Cancelled(Progress(text, len(gen.tokens)))
        n = len(gen.tokens)
        timings.update(prefill_ms=gen.prefill_ms, decode_ms=gen.decode_ms)
        timings["decode_ms_per_token"] = gen.decode_ms / max(n - 1, 1)
        total = (time.perf_counter() - start) * 1000.0
        timings["total_ms"] = total
        return GroundedAnswer(
            **self._grounded(text, question, mode, frame.size, stamp),
            latency_ms=total,
            timings=timings,
            new_tokens=n,
            encode_ms=frame.encode_ms if encoded_now else 0.0,
        )

    def _frame_for(self, image: np.ndarray | None, stamp: Hashable | None) -> tuple[Hashable, _Encoded, bool]:
        """The frame an ask is about; the lock is held."""
        if image is not None:
            return self._encode(image, stamp)
        if stamp is not None:
            if stamp not in self._frames:
                raise InputError(
                    f"no encoded frame with stamp {stamp!r} (cached: {len(self._frames)} frames); "
                    "encode(image, stamp) it first or pass the image"
                )
            self._frames.move_to_end(stamp)
            return stamp, self._frames[stamp], False
        if not self._frames:
            raise InputError("no frame has been encoded yet; pass an image or call encode(image, stamp) first")
        stamp = next(reversed(self._frames))
        return stamp, self._frames[stamp], False

    def _progress_callback(self, on_token: TokenCallback):
        decode = self._tokenizer.decode
        return lambda tokens: on_token(Progress(decode(tokens, skip_special_tokens=True), len(tokens)))

    def _grounded(self, text: str, question: str, mode: PromptMode, size: Size, stamp: Hashable) -> dict:
        grounded = ground(text, mode, self.image_size, size, question_subject(question))
        return {
            "answer": grounded.answer,
            "reasoning": grounded.reasoning,
            "box": grounded.box,
            "coherent": grounded.coherent,
            "text": text,
            "mode": mode.value,
            "format_ok": grounded.format_ok,
            "problems": grounded.problems,
            "stamp": stamp,
            "image_size": size,
            "model_box": grounded.model_box,
        }

    def close(self) -> None:
        with self._lock:
            self._frames.clear()
            self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
