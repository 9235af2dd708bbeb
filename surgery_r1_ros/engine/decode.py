"""The greedy decode loop, written once for every backend.

A backend supplies ``prefill(frame_state, suffix_ids, max_new_tokens) -> (first_token, step)``: it runs
the question suffix on top of the frame's prefilled prefix and returns the greedy first token and a
one-token ``step(token) -> next_token`` that carries its own key/value state and position. ``generate``
drives the loop: it stops at a stop id (kept in the output) or ``max_new_tokens``, reports every token to
``on_token`` and asks ``cancelled()`` before each decode step, so a cancel costs at most the step that is
already running. Everything runs inside ``backend.session()`` (torch: thread count, inference mode).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Step = Callable[[int], int]


@dataclass(frozen=True)
class Generation:
    tokens: list[int]  # new token ids, a final stop id included
    cancelled: bool  # stopped by the cancel check before reaching a stop id or the limit
    prefill_ms: float  # the question suffix's prefill and the first token
    decode_ms: float  # the remaining tokens


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def generate(
    backend: Any,
    frame_state: Any,
    suffix_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    *,
    on_token: Callable[[list[int]], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Generation:
    """Greedy tokens after ``suffix_ids`` on a prefilled frame; ``frame_state`` is left unchanged."""
    stops = set(stop_ids)
    with backend.session():
        start = time.perf_counter()
        token, step = backend.prefill(frame_state, suffix_ids, max_new_tokens)
        prefill_ms = _ms(start)
        start = time.perf_counter()
        tokens = [token]
        stopped = False
        if on_token is not None:
            on_token(tokens)
        while token not in stops and len(tokens) < max_new_tokens:
            if cancelled is not None and cancelled():
                stopped = True
                break
            token = step(token)
            tokens.append(token)
            if on_token is not None:
                on_token(tokens)
        return Generation(tokens, stopped, prefill_ms, _ms(start))


__all__ = ["Generation", "Step", "generate"]
