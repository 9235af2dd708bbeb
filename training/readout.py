"""Readout refit: the output head's protocol rows fitted to what the language model's last layer already holds.

Measured on the built-in model (README, "What limits the rest"): its language model reads a frame's
instrument states into its last hidden state, but its output head, tied to the input embeddings and trained
by SFT's few noisy passes over each state, does not read them out. Refitting the answer rows alone, on
frozen hidden states, raised held-out direct state accuracy from 0.346 to 0.520 (0.286 with another
sequence's frames). It also let an answer row win inside the reasoning ("... located in theClipping</answer>"):
the protocol's tag rows (``</think>``, ``<answer>``, ...) compete at the same positions, so they are fitted
with the answer rows (reasoning format 0.923 -> 0.958 on the 1,566 held-out questions), and so are the rows of
the instrument names as reasoning writes them ("... the asked-about bipolar forceps ..."): without them the
built-in model's reasoning named the instrument asked about in 0.25 of its answers, with them 0.41 (format
0.958 -> 0.989), and the rows of the states as reasoning writes them ("Its state is tissue manipulation: ..."),
where the reasoning states what it concludes. The box digits' rows are not fitted: fitting them raised
teacher-forced digit accuracy but lowered true mIoU (0.238 -> 0.214).

At run time a reasoning answer follows the model's own reasoning, not SFT's templates, and the hidden states
it is read from differ accordingly. With ``own_reasoning`` the stage first lets the model reason greedily on
that many more training questions, keeps its reasoning, appends the true answer and box, and adds only the
answer and tag positions after the reasoning to the fit. On the built-in model (2,000 questions, 1,920 of
which closed their ``<think>`` block; 1,566 held-out questions): reasoning accuracy 0.527 -> 0.587 (organ
0.767 -> 0.980), format 0.989 -> 0.980, and direct accuracy 0.624 -> 0.635 as well.

This stage freezes the whole model, runs it teacher-forced over training rows (no augmentation) and keeps, at
every completion position, the last hidden state and the target token. Then only the output head's rows of the
answer vocabulary's tokens (``vocab.ANSWERS``: states, quadrants, organs), of the protocol's tags
(``TAG_TOKENS``) and of the instrument names and states in words are fitted, with the full softmax over the
vocabulary at every position: the rows learn to win where their token is due and are pushed down everywhere
else (box digits, other reasoning words). Every other row keeps its weights, so nothing but the competition
between answers, tags, names and state words
changes. With the rest fixed this is a convex problem on cached vectors: 400
full-batch steps take 1.5 min on 2 CPU cores; the step kept is the best on held-out frames.

The head is untied from the input embeddings first (the saved config says ``tie_word_embeddings: false``,
as Qwen2.5-VL-7B's does); the model stays a plain ``Qwen2_5_VLForConditionalGeneration``. No library fits
a subset of an LM head's rows on cached states, so it is written here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from surgery_r1_ros.model.prompts import IGNORE_INDEX
from surgery_r1_ros.model.tokenizer import TAG_TOKENS
from surgery_r1_ros.vocab import ANSWERS, INSTRUMENTS, STATES, instrument_phrase, state_phrase

from .config import DataConfig
from .dataset import ImageCache, SFTCollator, load_records, sft_row

log = logging.getLogger(__name__)


@dataclass
class Positions:
    """Cached completion positions: last hidden state, target token and the frame each came from."""

    hidden: torch.Tensor  # positions x hidden
    target: torch.Tensor  # positions
    frame: torch.Tensor  # positions

    def subset(self, keep: torch.Tensor) -> Positions:
        return Positions(self.hidden[keep], self.target[keep], self.frame[keep])

    def join(self, other: Positions) -> Positions:
        return Positions(
            torch.cat([self.hidden, other.hidden]),
            torch.cat([self.target, other.target]),
            torch.cat([self.frame, other.frame]),
        )


def token_ids(tokenizer, texts: tuple[str, ...]) -> list[int]:
    """Every token of every text, sorted."""
    return sorted({t for text in texts for t in tokenizer.encode(text, add_special_tokens=False)})


def readout_token_ids(tokenizer) -> list[int]:
    """Every token of every answer label, protocol tag, and instrument name and state as a sentence writes them
    (the rows this stage fits)."""
    words = tuple(" " + instrument_phrase(name) for name in INSTRUMENTS) + tuple(" " + state_phrase(s) for s in STATES)
    return token_ids(tokenizer, ANSWERS + TAG_TOKENS + words)


def answer_and_tag_ids(tokenizer) -> list[int]:
    """The tokens of the answer labels and protocol tags: what is learnt after the model's own reasoning."""
    return token_ids(tokenizer, ANSWERS + TAG_TOKENS)


def frame_ids_of(rows: list[dict]) -> dict[str, int]:
    """Frame path -> integer id (the held-out split is drawn over these)."""
    return {path: i for i, path in enumerate(sorted({r["image_path"] for r in rows}))}


@torch.inference_mode()
def collect_positions(
    loaded, rows: list[dict], batch_size: int = 32, frame_ids: dict[str, int] | None = None
) -> Positions:
    """Teacher-forced pass over SFT rows; the last hidden state before every completion token (on the model's
    device: a real Qwen2.5-VL's vocabulary makes the fit a GPU job)."""
    model = loaded.model
    collate = SFTCollator(loaded.processor, ImageCache())
    frame_ids = frame_ids or frame_ids_of(rows)
    hidden, target, frame = [], [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="readout positions", unit="batch"):
        chunk = rows[start : start + batch_size]
        batch = collate(chunk)
        labels = batch.pop("labels")
        out = model.model(**{k: v.to(model.device) for k, v in batch.items()})
        states, labels = out.last_hidden_state[:, :-1].float(), labels[:, 1:].to(model.device)  # t predicts t+1
        keep = labels != IGNORE_INDEX
        hidden.append(states[keep])
        target.append(labels[keep])
        ids = torch.tensor([frame_ids[r["image_path"]] for r in chunk], device=model.device)
        frame.append(ids[:, None].expand_as(labels)[keep])
    return Positions(torch.cat(hidden), torch.cat(target), torch.cat(frame))


def own_reasoning_rows(loaded, records: list[dict], batch_size: int = 16, max_new_tokens: int = 192) -> list[dict]:
    """Reasoning rows whose reasoning is the model's own (greedy, on the record's frame), then the true answer and box.

    SFT's reasoning targets are the mix's templates; at run time the answer follows the model's own reasoning,
    which differs from them, so the hidden states the answer is read from differ too. Records whose completion
    has no closed ``<think>`` block within ``max_new_tokens`` are left out.
    """
    from surgery_r1_ros.model import image_size
    from surgery_r1_ros.protocol import PromptMode, parse_output

    from .evaluate import Item, generate

    records = [r for r in records if r.get("box") is not None]
    items = [
        Item(r["image"], tuple(r["image_size"]), r["question"], r["answer"], tuple(r["box"]), r.get("subject"))
        for r in records
    ]
    completions = generate(loaded, items, PromptMode.REASON, batch_size, max_new_tokens)
    size = image_size(loaded.processor)
    rows = []
    for record, text in zip(records, completions, strict=True):
        reasoning = parse_output(text).reasoning
        if reasoning:
            rows.append(sft_row({**record, "reasoning": reasoning}, size))
    return rows


def own_reasoning_from_mix(loaded, mix: str | Path, questions: int, seed: int, batch_size: int,
                           max_new_tokens: int) -> list[dict]:  # fmt: skip
    """``own_reasoning_rows`` on ``questions`` reasoning questions of ``mix`` (drawn with ``seed + 1``: not the
    refit's other rows); none for 0 questions."""
    if not questions:
        return []
    cot = load_records(DataConfig(mix=str(mix), kinds=["cot"], limit=questions, seed=seed + 1))
    rows = own_reasoning_rows(loaded, cot, batch_size, max_new_tokens)
    log.info("own reasoning: %d of %d completions closed their <think> block", len(rows), len(cot))
    return rows


def own_reasoning_positions(loaded, rows: list[dict], batch_size: int, frame_ids: dict[str, int]) -> Positions:
    """``rows``' positions due an answer-label or protocol-tag token; the reasoning positions are left out (the
    model wrote those tokens itself: fitting them would teach it nothing)."""
    positions = collect_positions(loaded, rows, batch_size, frame_ids)
    due = torch.tensor(answer_and_tag_ids(loaded.processor.tokenizer), device=positions.target.device)
    return positions.subset(torch.isin(positions.target, due))


class ReadoutRowsLoss:
    """Full-softmax cross-entropy over ``positions`` as a function of the readout rows alone.

    The other rows are fixed, so their log-sum-exp and, where the target is not a readout token, the target's
    logit are computed once; a step then costs one (positions x readout rows) product. Full-vocabulary logits
    are computed ``chunk`` positions at a time (by default 64 M logits at most).
    """

    def __init__(self, head: torch.Tensor, rows: list[int], positions: Positions, chunk: int | None = None) -> None:
        self.head, self.rows, self.hidden = head, torch.tensor(rows, device=head.device), positions.hidden
        self.chunk = chunk or max(1, (1 << 26) // head.shape[0])
        fixed = torch.ones(head.shape[0], dtype=torch.bool, device=head.device)
        fixed[self.rows] = False
        fixed_rows = head[fixed]
        chunks = list(zip(positions.hidden.split(self.chunk), positions.target.split(self.chunk), strict=True))
        self.fixed_lse = torch.cat([torch.logsumexp(h @ fixed_rows.T, dim=-1) for h, _ in chunks])
        self.fixed_own = torch.cat([(h * head[t]).sum(-1) for h, t in chunks])
        column = torch.full((head.shape[0],), -1, dtype=torch.long, device=head.device)
        column[self.rows] = torch.arange(len(rows), device=head.device)
        self.column = column[positions.target]  # the target's column among the readout rows, or -1
        self.own_column = self.column.clamp(min=0)[:, None]

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy with ``weight`` (readout rows x hidden) in the readout rows."""
        logits = self.hidden @ weight.T
        lse = torch.logaddexp(self.fixed_lse, torch.logsumexp(logits, dim=-1))
        own = torch.where(self.column >= 0, logits.gather(1, self.own_column)[:, 0], self.fixed_own)
        return (lse - own).mean()

    @torch.no_grad()
    def token_accuracy(self, weight: torch.Tensor) -> float:
        """Share of positions due a readout token where that token has the highest logit of the vocabulary."""
        due = self.column >= 0
        full = self.head.clone()
        full[self.rows] = weight
        right = [
            (h @ full.T).argmax(-1).eq(self.rows[c]).sum()
            for h, c in zip(self.hidden[due].split(self.chunk), self.column[due].split(self.chunk), strict=True)
        ]
        return (sum(right) / max(1, int(due.sum()))).item() if right else 0.0


def fit_readout_rows(
    head: torch.Tensor, rows: list[int], positions: Positions, steps: int = 400, lr: float = 1e-2, seed: int = 0
) -> tuple[torch.Tensor, dict]:
    """The head with its readout rows fitted; the step kept is the one with the lowest held-out loss.

    A tenth of the frames is held out; full-batch Adam.
    """
    generator = torch.Generator().manual_seed(seed)
    frames = positions.frame.unique()
    held_frames = frames[
        torch.randperm(len(frames), generator=generator)[: max(1, len(frames) // 10)].to(frames.device)
    ]
    is_held = torch.isin(positions.frame, held_frames)
    fit, held = (
        ReadoutRowsLoss(head, rows, positions.subset(~is_held)),
        ReadoutRowsLoss(head, rows, positions.subset(is_held)),
    )
    weight = nn.Parameter(head[rows].clone())
    optimiser = torch.optim.Adam([weight], lr=lr)
    with torch.no_grad():
        before = held(weight).item(), held.token_accuracy(weight)
    best = (before[0], 0, weight.detach().clone())
    for step in tqdm(range(1, steps + 1), desc="readout fit", unit="step"):
        optimiser.zero_grad()
        fit(weight).backward()
        optimiser.step()
        with torch.no_grad():
            held_loss = held(weight).item()
        if held_loss < best[0]:
            best = (held_loss, step, weight.detach().clone())
    fitted = head.clone()
    fitted[rows] = best[2]
    result = {
        "positions": len(positions.target), "rows_fitted": len(rows), "best_step": best[1],
        "held_loss_before": round(before[0], 4), "held_loss_after": round(best[0], 4),
        "held_token_accuracy_before": round(before[1], 4),
        "held_token_accuracy_after": round(held.token_accuracy(best[2]), 4),
    }  # fmt: skip
    return fitted, result


def refit_readout(
    model: str | Path,
    mix: str | Path,
    out: str | Path,
    questions: int = 2000,
    kinds: tuple[str, ...] = ("grounding", "vqa", "cot"),
    steps: int = 400,
    lr: float = 1e-2,
    seed: int = 0,
    batch_size: int = 32,
    own_reasoning: int = 0,
    reasoning_tokens: int = 192,
) -> dict:
    """Fit ``model``'s readout rows on ``questions`` questions of the training ``mix`` and, with ``own_reasoning``,
    on that many reasoning questions answered after the model's own reasoning (at most ``reasoning_tokens`` long,
    as in evaluation); save it to ``out``."""
    from surgery_r1_ros.model import image_size, load_model, save_model

    from .common import resolve_model

    loaded = load_model(resolve_model(str(model)))
    loaded.model.eval()
    records = load_records(DataConfig(mix=str(mix), kinds=list(kinds), limit=questions, seed=seed))
    rows = [sft_row(r, image_size(loaded.processor)) for r in records]
    own_rows = own_reasoning_from_mix(loaded, mix, own_reasoning, seed, batch_size, reasoning_tokens)
    frame_ids = frame_ids_of(rows + own_rows)
    positions = collect_positions(loaded, rows, batch_size, frame_ids)
    if own_rows:
        positions = positions.join(own_reasoning_positions(loaded, own_rows, batch_size, frame_ids))
    readout_rows = readout_token_ids(loaded.processor.tokenizer)
    head = loaded.model.lm_head.weight.detach().float()
    fitted, result = fit_readout_rows(head, readout_rows, positions, steps=steps, lr=lr, seed=seed)
    untie_output_head(loaded.model, fitted.to(loaded.model.lm_head.weight.dtype))
    result = {
        "rows": len(rows), "questions": questions, "kinds": list(kinds), "own_reasoning_rows": len(own_rows),
        "steps": steps, "lr": lr, **result,
    }  # fmt: skip
    source = loaded.path
    save_model(loaded, out, {"readout": result})
    write_card(source, Path(out), result)
    log.info("readout refit: %s -> %s", result, out)
    return result


def write_card(source: Path | None, out: Path, result: dict) -> Path:
    """The source model's card (README.md) with a section on this refit appended."""
    card = source / "README.md" if source else None
    text = card.read_text(encoding="utf-8").rstrip() + "\n\n" if card and card.is_file() else ""
    own = result.get("own_reasoning_rows", 0)
    own_text = f",\nand the answer and tag positions of {own} rows with the model's own reasoning" if own else ""
    text += f"""## Readout refit (`training/readout.py`)
The output head was untied from the input embeddings and the {result["rows_fitted"]} rows of its answer labels',
protocol tags' and instrument names' tokens refit, everything else frozen, on {result["positions"]} completion
positions of {result["rows"]} training rows ({", ".join(result["kinds"])}){own_text}: full-batch Adam,
lr {result["lr"]}, step {result["best_step"]} of {result["steps"]} kept (lowest loss on a tenth of the frames held
out). On those held-out frames: loss {result["held_loss_before"]} -> {result["held_loss_after"]}, those tokens
written right {result["held_token_accuracy_before"]} -> {result["held_token_accuracy_after"]}.
"""
    path = out / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def untie_output_head(model, weight: torch.Tensor) -> None:
    """Give the model its own output head, ``weight``, apart from the input embeddings; say so in its config."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(weight)
