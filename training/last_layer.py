"""Last-layer refit: the language model's last decoder layer trained on cached inputs, at completion positions only.

Why (README, "What limits the rest"): on the built-in model a reader with one attention over the frozen
tower's tokens, given enough examples, names instrument states and quadrants far better than the language
model does after SFT's ~12k rows, and the language model's answers are data-limited the way that reader's
are. SFT cannot see many more rows in its time: every step runs the vision tower and all layers over every
token of every row. With the tower and the first layers frozen, their output for a row is fixed, so it is
computed once and cached; the last layer's keys and values are then recomputed for every position (cheap
projections), but its query, attention output and MLP only where a completion token is predicted (a few
positions per row, against ~250 tokens), so an epoch costs a fraction of an SFT pass.

The layer (and the final norm) are trained with the full-vocabulary cross-entropy of SFT at every completion
position, output head fixed; the step kept is the one with the lowest loss on a tenth of the frames held out.
No library trains one decoder layer on a subset of query positions over cached keys, so it is written here.
``last_layer_logits`` is checked against the model's own forward in the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from surgery_r1_ros.model.prompts import IGNORE_INDEX
from surgery_r1_ros.vocab import QuestionKind, parse_question

from .box_attention import attention_loss
from .config import DataConfig
from .dataset import ImageCache, SFTCollator, load_records, sft_row
from .readout import answer_and_tag_ids, frame_ids_of, own_reasoning_from_mix

log = logging.getLogger(__name__)


@dataclass
class CachedRows:
    """Per row (unpadded): the last layer's input, the rope position ids and the next-token targets."""

    hidden: list[torch.Tensor]  # (length, hidden) in the cache dtype
    position_ids: list[torch.Tensor]  # (3, length)
    targets: list[torch.Tensor]  # (length,): the token position t predicts, IGNORE_INDEX off the completion
    frame: torch.Tensor  # (rows,)
    box_tags: tuple[int, int] | None = None  # ids of <box> and </box>: box positions get soft targets
    teacher: list[torch.Tensor] | None = None  # per row: the original model's probabilities at its box positions
    box_keys: list[torch.Tensor] | None = None  # per row: positions of the image tokens inside its box (box attention)
    box_from: torch.Tensor | None = None  # (rows,): position of each row's first target token box attention supervises

    def subset(self, keep: list[int]) -> CachedRows:
        def pick(values: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return [values[i] for i in keep] if values is not None else None

        return CachedRows(
            pick(self.hidden), pick(self.position_ids), pick(self.targets), self.frame[keep], self.box_tags,
            pick(self.teacher), pick(self.box_keys), self.box_from[keep] if self.box_from is not None else None,
        )  # fmt: skip


def language_model(model):
    """The decoder stack (``Qwen2_5_VLTextModel``) of a ``Qwen2_5_VLForConditionalGeneration``."""
    return model.model.language_model


class _Captured(Exception):
    """Stops the forward pass once the last layer's input is captured."""


@torch.inference_mode()
def cache_rows(loaded, rows: list[dict], batch_size: int = 32, dtype: torch.dtype = torch.float32) -> CachedRows:
    """Teacher-forced pass over SFT rows, keeping what the last decoder layer is given. Rows are taken in frame
    order, so the rows of one frame share one pass of the vision tower (``encode_frames_once``); the cache keeps
    that order. A row marked ``answer_only`` (the model's own reasoning, ``own_reasoning_rows``) keeps only its
    answer-label and protocol-tag targets: the model wrote the rest itself. Each row also keeps the positions of
    its image tokens inside its ``attend_box`` (none without one), where box attention looks, and the position from
    which on it looks there (``SFTCollator``'s ``box_from``)."""
    from .evaluate import encode_frames_once

    model = loaded.model
    rows = sorted(rows, key=lambda r: r["image_path"])
    lm = language_model(model)
    captured: dict[str, torch.Tensor] = {}

    def take_layer_input(_module, args, kwargs):
        captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        raise _Captured  # the last layer and the head are not needed here

    def take_positions(_module, args, kwargs):
        captured["position_ids"] = kwargs.get("position_ids", args[1] if len(args) > 1 else None)

    hooks = [
        lm.layers[-1].register_forward_pre_hook(take_layer_input, with_kwargs=True),
        lm.rotary_emb.register_forward_pre_hook(take_positions, with_kwargs=True),
    ]
    collate = SFTCollator(loaded.processor, ImageCache(), box_cells=True)
    frame_ids = frame_ids_of(rows)
    due = torch.tensor(answer_and_tag_ids(loaded.processor.tokenizer))
    hidden, positions, targets, box_keys, box_from = [], [], [], [], []
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="last-layer inputs", unit="batch"):
            chunk = rows[start : start + batch_size]
            batch = collate(chunk)
            labels = batch.pop("labels")
            cells = batch.pop("box_cells")
            box_from += batch.pop("box_from").tolist()
            inputs = encode_frames_once(model, {k: v.to(model.device) for k, v in batch.items()},
                                        [r["image_path"] for r in chunk])  # fmt: skip
            with contextlib.suppress(_Captured):
                model.model(**inputs)
            layer_input = captured["hidden"].to("cpu", dtype)
            position_ids = captured["position_ids"].expand(3, -1, -1).to("cpu", torch.int32)
            lengths = batch["attention_mask"].sum(1).tolist()  # right-padded (targets given)
            shifted = torch.full_like(labels, IGNORE_INDEX)
            shifted[:, :-1] = labels[:, 1:]  # position t predicts token t + 1
            for row, length in enumerate(lengths):
                target = shifted[row, :length].clone()
                if chunk[row].get("answer_only"):
                    target[~torch.isin(target, due)] = IGNORE_INDEX
                hidden.append(layer_input[row, :length].clone())
                positions.append(position_ids[:, row, :length].clone())
                targets.append(target)
                image_positions = (batch["input_ids"][row] == model.config.image_token_id).nonzero().flatten()
                box_keys.append(image_positions[cells[row]].to(torch.int32))
    finally:
        for hook in hooks:
            hook.remove()
    frame = torch.tensor([frame_ids[r["image_path"]] for r in rows])
    return CachedRows(hidden, positions, targets, frame, box_keys=box_keys, box_from=torch.tensor(box_from))


def _pad(tensors: list[torch.Tensor], value: float | int) -> torch.Tensor:
    """Right-pad along the last dimension and stack."""
    length = max(t.shape[-1] for t in tensors)
    return torch.stack([F.pad(t, (0, length - t.shape[-1]), value=value) for t in tensors])


def last_layer_logits(model, hidden: torch.Tensor, position_ids: torch.Tensor, lengths: torch.Tensor,
                      queries: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Logits of the model at positions ``queries`` (batch x q), given the last layer's input ``hidden``
    (batch x length x hidden, right-padded to ``lengths``) and ``position_ids`` (3 x batch x length).

    The same arithmetic as the decoder layer, the final norm and the head, with the query, attention output
    and MLP computed at the chosen positions only.
    """
    return _last_layer(model, hidden, position_ids, lengths, queries, query_mask, first_head=False)[0]


def _last_layer(model, hidden: torch.Tensor, position_ids: torch.Tensor, lengths: torch.Tensor, queries: torch.Tensor,
                query_mask: torch.Tensor, first_head: bool) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``last_layer_logits``, and with ``first_head`` the attention weights (batch x q x length) of the layer's
    first head at the query positions (what box attention supervises)."""
    lm = language_model(model)
    layer = lm.layers[-1]
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    cos, sin = lm.rotary_emb(hidden, position_ids)
    x = layer.input_layernorm(hidden)
    keys = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    values = attn.v_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    keys = keys * cos[:, None] + _rotate_half(keys) * sin[:, None]
    pick = queries[..., None].expand(-1, -1, hidden.shape[-1])
    x_q = x.gather(1, pick)
    q = attn.q_proj(x_q).view(batch, queries.shape[1], -1, attn.head_dim).transpose(1, 2)
    rope = queries[..., None].expand(-1, -1, cos.shape[-1])
    cos_q, sin_q = cos.gather(1, rope)[:, None], sin.gather(1, rope)[:, None]
    q = q * cos_q + _rotate_half(q) * sin_q
    key_index = torch.arange(length, device=hidden.device)
    allowed = (key_index[None, None, :] <= queries[..., None]) & (key_index[None, None, :] < lengths[:, None, None])
    allowed &= query_mask[..., None]
    allowed[..., 0] = True  # padded queries attend to the first token (their output is ignored)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=allowed[:, None], scale=attn.scaling, enable_gqa=True
    )
    weights = None
    if first_head:  # query head 0 reads key/value head 0 (grouped-query attention)
        scores = (q[:, 0] @ keys[:, 0].transpose(-1, -2)) * attn.scaling
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = attn.o_proj(out.transpose(1, 2).reshape(batch, queries.shape[1], -1))
    h = hidden.gather(1, pick) + out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h)), weights


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def box_positions(targets: torch.Tensor, box_tags: tuple[int, int]) -> torch.Tensor:
    """Which of ``targets`` (a row's completion tokens, in order) lie inside a box: after ``<box>``, up to and
    including ``</box>``."""
    opened = torch.cumsum(targets == box_tags[0], -1) - (targets == box_tags[0]).long()
    closed = torch.cumsum(targets == box_tags[1], -1) - (targets == box_tags[1]).long()
    return opened > closed


def _batch(model, cached: CachedRows, rows: list[int], first_head: bool = False):
    """The logits at every completion position of ``rows``, their targets, and with ``first_head`` the attention
    mass the last layer's first head puts on each row's box (``CachedRows.box_keys``) at those positions, and
    which of them box attention supervises (rows with a box, from their ``box_from`` on)."""
    device = model.device
    hidden = _pad([cached.hidden[i].T for i in rows], 0.0).transpose(1, 2).to(device, torch.float32)
    position_ids = _pad([cached.position_ids[i] for i in rows], 0).permute(1, 0, 2).to(device, torch.long)
    lengths = torch.tensor([cached.hidden[i].shape[0] for i in rows], device=device)
    due = [(cached.targets[i] != IGNORE_INDEX).nonzero().flatten() for i in rows]
    queries = _pad(due, 0).to(device)
    query_mask = _pad([torch.ones(len(d), dtype=torch.bool) for d in due], False).to(device)
    targets = _pad([cached.targets[i][d] for i, d in zip(rows, due, strict=True)], IGNORE_INDEX).to(device)
    logits, weights = _last_layer(model, hidden, position_ids, lengths, queries, query_mask, first_head)
    if weights is None:
        return logits, targets, None
    inside = torch.zeros(hidden.shape[:2], dtype=weights.dtype, device=device)
    for row, i in enumerate(rows):
        inside[row, cached.box_keys[i].long()] = 1.0
    mass = (weights * inside[:, None, :]).sum(-1)
    has_box = torch.tensor([len(cached.box_keys[i]) > 0 for i in rows], device=device)
    supervised = has_box[:, None] & (queries + 1 >= cached.box_from[rows].to(device)[:, None])
    return logits, targets, (mass, supervised)


def batch_loss(model, cached: CachedRows, rows: list[int]) -> torch.Tensor:
    """Mean cross-entropy over every completion position of ``rows`` (SFT's loss, at the last layer); with
    ``cached.teacher``, box positions are scored against the original model's distribution instead of the label."""
    return batch_losses(model, cached, rows).sft


class Losses(NamedTuple):
    """``batch_losses``' terms: SFT's cross-entropy, and on the rows with a box (None when no row has one or the
    term is not asked for) the box attention loss with its attention mass."""

    sft: torch.Tensor
    box_attention: torch.Tensor | None = None
    box_mass: float | None = None


def batch_losses(model, cached: CachedRows, rows: list[int], box_attention: bool = False) -> Losses:
    """``batch_loss``, and with ``box_attention`` the box attention loss of ``box_attention.py`` for the last
    layer's first head, ``-log`` of its attention mass on the row's box at every supervised completion position
    (``_batch``), with that mass."""
    logits, targets, attention = _batch(model, cached, rows, first_head=box_attention)
    log_probs = logits.log_softmax(-1)
    valid = targets != IGNORE_INDEX
    losses = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    if cached.teacher is not None:
        inside = valid & box_positions(targets, cached.box_tags)
        soft = torch.cat([cached.teacher[i] for i in rows]).to(logits.device)
        losses = losses.masked_scatter(inside, -(soft * log_probs[inside]).sum(-1))
    sft = losses[valid].mean()
    if attention is None or not (supervised := attention[1] & valid).any():
        return Losses(sft)
    return Losses(sft, *attention_loss(attention[0][supervised], supervised.nonzero()[:, 0]))


@torch.no_grad()
def box_teacher(model, cached: CachedRows, box_tags: tuple[int, int], batch_size: int = 64) -> CachedRows:
    """``cached`` with the model's own probabilities at every box position, as targets that keep its boxes.

    Why: GRPO's IoU reward shaped the boxes the model writes greedily (direct true mIoU 0.219 -> 0.240 on the
    built-in model); fitting the layer to the label boxes undid that (true mIoU 0.238 -> 0.208, boxes with five
    numbers), though their teacher-forced loss fell."""
    teacher: list[torch.Tensor] = []
    for start in range(0, len(cached.hidden), batch_size):
        rows = list(range(start, min(start + batch_size, len(cached.hidden))))
        logits, targets, _ = _batch(model, cached, rows)
        inside = (targets != IGNORE_INDEX) & box_positions(targets, box_tags)
        probs = logits.softmax(-1)
        teacher += [probs[row][inside[row]].cpu() for row in range(len(rows))]
    return dataclasses.replace(cached, box_tags=box_tags, teacher=teacher)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The last decoder layer's and the final norm's parameters (everything else stays frozen)."""
    lm = language_model(model)
    return [*lm.layers[-1].parameters(), *lm.norm.parameters()]


def fit_last_layer(model, cached: CachedRows, epochs: int = 4, batch_size: int = 32, lr: float = 3e-4,
                   seed: int = 0, evals_per_epoch: int = 4, box_attention: float = 0.0) -> dict:  # fmt: skip
    """Train the last layer on ``cached`` (cosine schedule); the weights kept are those with the lowest loss on a
    tenth of the frames held out, checked ``evals_per_epoch`` times an epoch. ``box_attention`` > 0 adds the box
    attention loss (``batch_losses``) times that weight to the training loss; the held-out loss the step is chosen
    on stays SFT's, and the first head's attention mass on the box is recorded before and after."""
    generator = torch.Generator().manual_seed(seed)
    frames = cached.frame.unique()
    held_frames = frames[torch.randperm(len(frames), generator=generator)[: max(1, len(frames) // 10)]]
    is_held = torch.isin(cached.frame, held_frames)
    train_rows = (~is_held).nonzero().flatten().tolist()
    held_rows = is_held.nonzero().flatten().tolist()
    for p in model.parameters():
        p.requires_grad_(False)
    params = trainable_parameters(model)
    for p in params:
        p.requires_grad_(True)
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total = steps_per_epoch * epochs
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))

    attend = box_attention > 0
    held_chunks = [held_rows[i : i + 64] for i in range(0, len(held_rows), 64)]
    held_weights = [sum(int((cached.targets[r] != IGNORE_INDEX).sum()) for r in c) for c in held_chunks]

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [batch_loss(model, cached, c).item() * w for c, w in zip(held_chunks, held_weights, strict=True)]
        model.train()
        return sum(losses) / max(1, sum(held_weights))

    def held_box_mass() -> float | None:
        """Mean over held-out chunks of the first head's attention mass on the box (None without box attention)."""
        if not attend:
            return None
        with torch.no_grad():
            masses = [batch_losses(model, cached, c, box_attention=True).box_mass for c in held_chunks]
            masses = [m for m in masses if m is not None]
        return round(sum(masses) / len(masses), 4) if masses else None

    before, mass_before = held_loss(), held_box_mass()
    best = (before, 0, [p.detach().clone() for p in params])
    check_every = max(1, steps_per_epoch // evals_per_epoch)
    step, trace = 0, []
    model.train()
    progress = tqdm(total=total, desc="last-layer fit", unit="step")
    for _epoch in range(epochs):
        order = torch.randperm(len(train_rows), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = [train_rows[i] for i in order[start : start + batch_size]]
            terms = batch_losses(model, cached, batch, box_attention=attend)
            loss = terms.sft
            if terms.box_attention is not None:
                loss = loss + box_attention * terms.box_attention
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            schedule.step()
            step += 1
            progress.update()
            if step % check_every == 0 or step == total:
                current = held_loss()
                trace.append({"step": step, "train_loss": round(loss.item(), 4), "held_loss": round(current, 4)})
                progress.set_postfix(held=f"{current:.4f}")
                if current < best[0]:
                    best = (current, step, [p.detach().clone() for p in params])
    progress.close()
    with torch.no_grad():
        for p, kept in zip(params, best[2], strict=True):
            p.copy_(kept)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return {
        "rows": len(cached.hidden), "train_rows": len(train_rows), "held_rows": len(held_rows),
        "steps": total, "best_step": best[1], "held_loss_before": round(before, 4),
        "held_loss_after": round(best[0], 4), "trace": trace,
        **({"box_attention_mass_before": mass_before, "box_attention_mass_after": held_box_mass()} if attend else {}),
    }  # fmt: skip


def attend_only(rows: list[dict], questions: list[str]) -> list[dict]:
    """``rows`` with box attention (their ``attend_box``) kept only on questions of the given kinds."""
    known = [str(kind) for kind in QuestionKind]
    if unknown := sorted(set(questions) - set(known)):
        raise ValueError(f"box attention questions {unknown} are not question kinds; use some of {known}")
    kinds = {QuestionKind(q) for q in questions}
    return [row if parse_question(row["question"])[0] in kinds else {**row, "attend_box": None} for row in rows]


def refit_last_layer(
    model: str | Path,
    mix: str | Path,
    out: str | Path,
    questions: int = 4000,
    kinds: tuple[str, ...] = ("grounding", "vqa", "cot"),
    epochs: int = 4,
    lr: float = 3e-4,
    seed: int = 0,
    batch_size: int = 32,
    keep_boxes: bool = True,
    own_reasoning: int = 0,
    reasoning_tokens: int = 192,
    box_attention: float = 0.0,
    box_attention_questions: list[str] | None = None,
) -> dict:
    """Refit ``model``'s last decoder layer on ``questions`` questions of the training ``mix``; save to ``out``;
    returns what the model's metadata records (settings, steps, held-out loss before and after).
    ``keep_boxes``: box positions learn the model's own distribution, not the label (``box_teacher``).
    ``own_reasoning``: that many more reasoning questions, answered after the model's own reasoning (at most
    ``reasoning_tokens``, as in evaluation), add their answer and tag positions (as in ``refit_readout``).
    ``box_attention``: the weight of the box attention loss on the layer's first head (``fit_last_layer``);
    ``box_attention_questions``: the question kinds (organ, state, location) it applies to (default: all)."""
    from surgery_r1_ros.model import image_size, load_model, save_model

    from .common import resolve_model

    loaded = load_model(resolve_model(str(model)))
    loaded.model.eval()
    records = load_records(DataConfig(mix=str(mix), kinds=list(kinds), limit=questions, seed=seed))
    rows = [sft_row(r, image_size(loaded.processor)) for r in records]
    if box_attention_questions is not None:
        rows = attend_only(rows, box_attention_questions)
    own = own_reasoning_from_mix(loaded, mix, own_reasoning, seed, batch_size, reasoning_tokens)
    own_rows = [{**row, "answer_only": True} for row in own]
    cached = cache_rows(loaded, rows + own_rows, batch_size)
    if keep_boxes:
        tags = tuple(loaded.processor.tokenizer.convert_tokens_to_ids(["<box>", "</box>"]))
        cached = box_teacher(loaded.model, cached, tags)
    fit = fit_last_layer(loaded.model, cached, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         box_attention=box_attention)  # fmt: skip
    fit.pop("trace")  # the per-step losses stay out of the model's metadata and the stage records
    result = {"questions": questions, "kinds": list(kinds), "own_reasoning_rows": len(own_rows), "epochs": epochs,
              "lr": lr, "keep_boxes": keep_boxes, **({"box_attention": box_attention} if box_attention else {}),
              **({"box_attention_questions": list(box_attention_questions)}
                 if box_attention and box_attention_questions is not None else {}),
              **fit}  # fmt: skip
    save_model(loaded, out, {"last_layer": result})
    log.info("last-layer refit: %s -> %s", result, out)
    return result
