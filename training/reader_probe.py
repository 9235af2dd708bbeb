"""What the vision tower's tokens offer a question-conditioned reader: an attentive probe.

The language model answers "Where is X?" / "What is the state of X?" by attending from the question to the
image tokens. This probe does the same with the least machinery that can: a learned query per instrument,
one attention over the frozen tower's tokens (after a LayerNorm, as the language model's RMSNorm), and a
small MLP that names the instrument's quadrant and state. It is trained on frames of the training split and
scored on the held-out split, with each question's own frame and with another frame (a reader that uses the
image must fall to about the prior). Its held-out accuracy is what a language model could get out of this
tower; the gap to the model's own accuracy is the language model's reading.

    surgery-r1 probe --model runs/builtin/vision/final --train runs/builtin/data/train --test runs/builtin/data/test

Hand-written: no library probes a vision encoder per question this way (linear probes read one token).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from surgery_r1_ros.model.processor import image_token_count
from surgery_r1_ros.vocab import INSTRUMENTS, QUADRANTS, STATES

from .vision_pretrain import DenseDataset, dense_collate, dense_frames, grid_of, tower_tokens

log = logging.getLogger(__name__)


class AttentiveReader(nn.Module):
    """One attention over the image tokens with a learned query per instrument, then quadrant and state."""

    def __init__(self, hidden: int, key: int = 64, value: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.key = nn.Linear(hidden, key)
        self.value = nn.Linear(hidden, value)
        self.query = nn.Embedding(len(INSTRUMENTS), key)
        self.out = nn.Sequential(nn.Linear(value + key, 256), nn.GELU(), nn.Linear(256, len(QUADRANTS) + len(STATES)))

    def forward(self, tokens: torch.Tensor, instrument: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quadrant and state logits for (frame tokens: batch x cells x hidden, instrument index: batch)."""
        x = self.norm(tokens)
        q = self.query(instrument)
        attention = torch.softmax(torch.einsum("bck,bk->bc", self.key(x), q) / q.shape[-1] ** 0.5, dim=-1)
        read = torch.einsum("bc,bcv->bv", attention, self.value(x))
        quadrant, state = self.out(torch.cat([read, q], dim=-1)).split([len(QUADRANTS), len(STATES)], dim=-1)
        return quadrant, state


@torch.inference_mode()
def encode_frames(loaded, root: str | Path, limit: int | None, batch_size: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """The tower's tokens of the first ``limit`` frames under ``root`` and one row per (frame, instrument):
    frame index, instrument, quadrant and state indices (from the dense sidecar records)."""
    frames = dense_frames(root)[:limit]
    dataset = DenseDataset(frames, loaded.processor, train=False)
    grid = grid_of(loaded.processor)
    visual = loaded.model.model.visual
    tokens = []
    for start in tqdm(range(0, len(frames), batch_size), desc=f"tower tokens {Path(root).name}", unit="batch"):
        batch = dense_collate([dataset[i] for i in range(start, min(start + batch_size, len(frames)))])
        out = tower_tokens(visual, batch["pixel_values"], grid)
        tokens.append(out.float().reshape(-1, image_token_count(loaded.processor), out.shape[-1]))
    items = [
        (i, INSTRUMENTS.index(inst["name"]), QUADRANTS.index(inst["quadrant"]), STATES.index(inst["state"]))
        for i, frame in enumerate(frames)
        for inst in json.loads(frame.record.read_text())["instruments"]
    ]
    return torch.cat(tokens), np.array(items, np.int64)


def prior_accuracy(train: np.ndarray, test: np.ndarray, column: int) -> float:
    """Accuracy of answering each instrument's commonest training value (the answer without the image)."""
    guess = {tool: np.bincount(train[train[:, 1] == tool, column]).argmax() for tool in np.unique(train[:, 1])}
    return float(np.mean([guess.get(tool, -1) == value for tool, value in test[:, [1, column]]]))


def score(reader: AttentiveReader, tokens: torch.Tensor, items: np.ndarray, frame_of: np.ndarray) -> dict[str, float]:
    """Quadrant and state accuracy with each item read off frame ``frame_of[item's frame]``."""
    with torch.no_grad():
        rows = torch.from_numpy(items)
        quadrant, state = reader(tokens[torch.from_numpy(frame_of[items[:, 0]])], rows[:, 1])
    return {"quadrant": float((quadrant.argmax(-1) == rows[:, 2]).float().mean()),
            "state": float((state.argmax(-1) == rows[:, 3]).float().mean())}  # fmt: skip


def probe_reader(
    model: str | Path, train_root: str | Path, test_root: str | Path, train_frames: int = 4000, steps: int = 3000,
    batch_size: int = 128, seed: int = 0,
) -> dict:  # fmt: skip
    """Train the attentive reader on ``model``'s frozen tower; held-out accuracy with own and swapped frames."""
    from surgery_r1_ros.model import load_model

    loaded = load_model(model, device="cpu")
    train_tokens, train_items = encode_frames(loaded, train_root, train_frames)
    test_tokens, test_items = encode_frames(loaded, test_root, None)
    torch.manual_seed(seed)
    reader = AttentiveReader(train_tokens.shape[-1])
    optimizer = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.from_numpy(train_items)
    for _ in tqdm(range(steps), desc="attentive probe", unit="step"):
        batch = rows[torch.randint(len(rows), (batch_size,), generator=generator)]
        quadrant, state = reader(train_tokens[batch[:, 0]], batch[:, 1])
        loss = nn.functional.cross_entropy(quadrant, batch[:, 2]) + nn.functional.cross_entropy(state, batch[:, 3])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    n = len(test_tokens)
    own = score(reader, test_tokens, test_items, np.arange(n))
    swapped = score(reader, test_tokens, test_items, (np.arange(n) + n // 2) % n)  # half the split away
    result = {
        "model": str(model),
        "train_items": len(train_items),
        "test_items": len(test_items),
        "steps": steps,
        "own_frames": own,
        "swapped_frames": swapped,
        "prior": {
            name: prior_accuracy(train_items, test_items, column) for name, column in (("quadrant", 2), ("state", 3))
        },
    }
    log.info("attentive probe: %s", json.dumps(result))
    return result
