"""The PyTorch backend: runs the Qwen2.5-VL model from transformers on CPU or CUDA.

CPU (the tested path): the frame prefix is prefilled once into a DynamicCache whose per-layer key/value
tensors are kept as the frame state (``TorchPrefix``). Each ask starts a fresh DynamicCache from those
tensors (its first update concatenates, so the frame's tensors are never modified), prefills the question
suffix with 3-row M-RoPE positions that continue after the image, and hands ``engine.decode`` a one-token
step.

CUDA: bf16 weights, and a static KV cache allocated once; each ask copies the frame prefix into it in
place, prefills the suffix eagerly and runs the one-token decode step through ``torch.compile``
(mode "reduce-overhead", i.e. CUDA graphs), falling back to eager decoding if compilation fails.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, StaticCache

from surgery_r1_ros.engine.backends import SMALL_MODEL_PARAMETERS
from surgery_r1_ros.engine.decode import Step
from surgery_r1_ros.engine.rope import prefix_positions, text_positions
from surgery_r1_ros.model import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchPrefix:
    """A prefilled frame prefix: per-layer (key, value) and the next text position."""

    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    prefix_length: int
    next_position: int


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block only (torch's setting is process-wide)."""
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TorchBackend:
    name = "torch"

    def __init__(self, loaded: LoadedModel, *, static_cache: bool | None = None, compile: bool | None = None,
                 max_cache_len: int = 1024, threads: int | None = None) -> None:  # fmt: skip
        """``threads``: CPU intra-op threads while this backend runs (restored afterwards). Default: 1 for
        a small model on CPU, whose matrices are too small to gain from splitting and which, on a busy
        machine, loses far more to waiting threads (measured on 2 cores under load: 2 threads ran the
        built-in model 5-10x slower than 1); torch's own setting otherwise."""
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.processor = loaded.processor
        self.device = str(self.model.device)
        on_cuda = self.model.device.type == "cuda"
        self.static_cache = on_cuda if static_cache is None else static_cache
        self.compile = (on_cuda and self.static_cache) if compile is None else compile
        self.max_cache_len = max_cache_len
        small = sum(p.numel() for p in self.model.parameters()) < SMALL_MODEL_PARAMETERS
        self.threads = threads if threads is not None else (1 if small and not on_cuda else None)
        self.config = self.model.config
        self.text_model = self.model.model.language_model
        self.lm_head = self.model.lm_head
        self.embed = self.model.model.get_input_embeddings()
        self._static: StaticCache | None = None
        self._decode_step = self._eager_step
        if self.compile:
            self._decode_step = torch.compile(self._eager_step, mode="reduce-overhead", fullgraph=False, dynamic=False)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Around every call of the Engine: this backend's thread count and inference mode."""
        with _torch_threads(self.threads), torch.inference_mode():
            yield

    # -- frame prefix ------------------------------------------------------------------------------
    def encode_frame(self, pixel_values, image_grid_thw, prefix_ids: Sequence[int]) -> tuple[TorchPrefix, dict]:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        device = self.model.device
        pixel_values = torch.as_tensor(pixel_values).to(device)
        grid = torch.as_tensor(image_grid_thw).reshape(1, 3).to(device)
        image_embeds = self.model.model.get_image_features(pixel_values, grid, return_dict=True).pooler_output
        image_embeds = torch.cat(list(image_embeds), dim=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings["vision_encode_ms"] = _ms(start)

        start = time.perf_counter()
        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
        embeds = self.embed(ids)
        image_mask = (ids == self.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        merge = self.config.vision_config.spatial_merge_size
        positions, next_position = prefix_positions(prefix_ids, self.config.image_token_id, grid[0].tolist(), merge)
        position_ids = torch.from_numpy(positions).to(device).unsqueeze(1)
        cache = DynamicCache(config=self.config)
        self.text_model(inputs_embeds=embeds, position_ids=position_ids, cache=cache, use_cache=True)
        kv = tuple((layer.keys, layer.values) for layer in cache.layers)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings["prefix_prefill_ms"] = _ms(start)
        return TorchPrefix(kv, len(prefix_ids), next_position), timings

    # -- question and answer -----------------------------------------------------------------------
    def _eager_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        hidden = self.text_model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True)
        return self.lm_head(hidden.last_hidden_state[:, -1, :])

    def _fresh_cache(self, frame: TorchPrefix, total: int):
        if not self.static_cache:
            return DynamicCache(ddp_cache_data=[(k, v) for k, v in frame.kv], config=self.config)
        if self._static is None or self._static.get_max_length() < total:
            self._static = StaticCache(config=self.config, max_cache_len=max(self.max_cache_len, total))
        for layer, (k, v) in zip(self._static.layers, frame.kv, strict=True):
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
            layer.keys[:, :, : frame.prefix_length].copy_(k)
            layer.values[:, :, : frame.prefix_length].copy_(v)
            layer.cumulative_length.fill_(frame.prefix_length)
        return self._static

    def prefill(self, frame: TorchPrefix, suffix_ids: Sequence[int], max_new_tokens: int) -> tuple[int, Step]:
        device = self.model.device
        cache = self._fresh_cache(frame, frame.prefix_length + len(suffix_ids) + max_new_tokens)
        ids = torch.tensor([list(suffix_ids)], dtype=torch.long, device=device)
        pos = torch.from_numpy(text_positions(frame.next_position, len(suffix_ids))).to(device).unsqueeze(1)
        first = int(self._eager_step(ids, pos, cache).argmax(-1))
        position = frame.next_position + len(suffix_ids)
        step_ids = torch.empty((1, 1), dtype=torch.long, device=device)
        step_pos = torch.empty((3, 1, 1), dtype=torch.long, device=device)

        def step(token: int) -> int:
            nonlocal position
            step_ids.fill_(token)
            step_pos.fill_(position)
            position += 1
            return int(self._step(step_ids, step_pos, cache).argmax(-1))

        return first, step

    def _step(self, input_ids, position_ids, cache) -> torch.Tensor:
        if self._decode_step is self._eager_step:
            return self._eager_step(input_ids, position_ids, cache)
        try:
            return self._decode_step(input_ids, position_ids, cache)
        except Exception as err:  # compile problems must not take the robot's answers down
            log.warning("compiled decode step failed (%s); decoding eagerly from now on", err)
            self._decode_step = self._eager_step
            return self._eager_step(input_ids, position_ids, cache)

    def close(self) -> None:
        self._static = None
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()


def create(model: LoadedModel | str | Path | None = None, *, device: str | None = None, dtype=None,
           **options) -> TorchBackend:  # fmt: skip
    """Backend factory: ``model`` is a LoadedModel, a model folder, or None for the built-in model."""
    if not isinstance(model, LoadedModel):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(model, device=device, dtype=dtype)
    elif device is not None and torch.device(device) != model.model.device:
        model.model.to(device)
    return TorchBackend(model, **options)


__all__ = ["TorchBackend", "TorchPrefix", "create"]
