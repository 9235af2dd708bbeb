"""Where the language model holds an instrument's state: a linear probe on its last hidden state.

A model states an instrument's state at two places: right after ``<answer>`` in direct mode, and inside its
reasoning, where the mix's reasoning names the state or writes its visible cue, whichever comes first ("Its
state is idle: its jaws are closed ..."). The probe takes the last hidden state just before each (teacher-forced
on the mix's own reasoning), fits a multinomial logistic regression from it to the true state on the training split's
state questions, and scores it on the held-out split's (frames the model never saw), beside always giving
the commonest state. Its accuracy is what an output layer could read at that position; the model's own
answers there show what it does read. The positions come from the shared cue vocabulary
(``data.cues.STATE_CUES``) and state check (``coherence.state_mentions``), so a change of the reasoning's
wording needs no change here.

    surgery-r1 probe-states --model builtin --train runs/builtin/data/train --test runs/builtin/data/test

Hand-written: a logistic regression on a few thousand vectors; no library takes hidden states at chosen
positions of a chat-templated VLM prompt.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from surgery_r1_ros.coherence import state_mentions
from surgery_r1_ros.data.cues import STATE_CUES
from surgery_r1_ros.protocol import PromptMode
from surgery_r1_ros.vocab import STATES

from .dataset import ImageCache

log = logging.getLogger(__name__)

# Where the probe reads: the prompt mode and the completion written before the state is given.
POSITIONS = ("answer", "reasoning")


def prefix_before_state(record: dict, position: str) -> tuple[PromptMode, str] | None:
    """The prompt mode and the completion up to where ``record``'s state is given at ``position``: ``<answer>``
    in direct mode, or its reasoning up to the first place that gives the state away, the state's name or its
    cue (None: the reasoning gives neither)."""
    if position == "answer":
        return PromptMode.GROUND, "<answer>"
    reasoning, state = record.get("reasoning") or "", record["answer"]
    starts = [reasoning.find(cue) for cue in STATE_CUES.get(state, ()) if cue in reasoning]
    starts += [start for start, named in state_mentions(reasoning) if named == state]
    return (PromptMode.REASON, "<think>" + reasoning[: min(starts)].rstrip()) if starts else None


def last_prefix_token(batch) -> torch.Tensor:
    """Per row of an ``encode_prompt`` batch with targets (right-padded, each target followed by <|im_end|>):
    the index of the target's last token."""
    return batch["attention_mask"].sum(1) - 2


@torch.inference_mode()
def hidden_before_state(loaded, records: list[dict], position: str, batch_size: int = 32) -> tuple[torch.Tensor, list]:
    """The last hidden state at the last token of each record's prefix (the position that predicts what
    follows), and the records that had one."""
    from surgery_r1_ros.model import encode_prompt

    images = ImageCache()
    kept = [(r, p) for r in records if (p := prefix_before_state(r, position)) is not None]
    vectors = []
    for start in tqdm(range(0, len(kept), batch_size), desc=f"hidden states ({position})", unit="batch"):
        chunk = kept[start : start + batch_size]
        modes, prefixes = zip(*(p for _, p in chunk), strict=True)
        frames, questions = [images(r["image"]) for r, _ in chunk], [r["question"] for r, _ in chunk]
        batch = encode_prompt(loaded.processor, frames, questions, list(modes), targets=list(prefixes))
        batch.pop("labels")
        hidden = loaded.model.model(**{k: v.to(loaded.model.device) for k, v in batch.items()}).last_hidden_state
        vectors.append(hidden[torch.arange(len(chunk)), last_prefix_token(batch).to(hidden.device)].float().cpu())
    return torch.cat(vectors), [r for r, _ in kept]


def fit_linear_probe(train: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 500,
                     weight_decay: float = 1e-3) -> torch.nn.Linear:  # fmt: skip
    """Multinomial logistic regression on standardised features (full-batch Adam); standardisation folded in."""
    mean, std = train.mean(0), train.std(0) + 1e-5
    probe = torch.nn.Linear(train.shape[1], classes)
    optimiser = torch.optim.Adam(probe.parameters(), lr=1e-2)
    x = (train - mean) / std
    for _ in range(steps):
        optimiser.zero_grad()
        loss = F.cross_entropy(probe(x), labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        probe.weight.div_(std)
        probe.bias.sub_(probe.weight @ mean)
    return probe


def probe_states(model: str | Path, train: str | Path, test: str | Path, questions: int = 1500, seed: int = 0) -> dict:
    """Per position: held-out accuracy of the probe, of the commonest training state, and the counts."""
    from surgery_r1_ros.data.mix import build_mix
    from surgery_r1_ros.data.vqla import load_vqla
    from surgery_r1_ros.model import load_model

    from .common import resolve_model

    loaded = load_model(resolve_model(str(model)))
    loaded.model.eval()

    def state_records(root: str | Path, limit: int | None) -> list[dict]:
        records = [r for r in build_mix(load_vqla(root, "all"), seed=seed) if r["kind"] == "cot"]
        return [r for r in records if r["answer"] in STATES][:limit]

    train_records, test_records = state_records(train, questions), state_records(test, None)
    result: dict = {"model": str(model), "train_questions": len(train_records), "test_questions": len(test_records)}
    for position in POSITIONS:
        x_train, fitted = hidden_before_state(loaded, train_records, position)
        x_test, scored = hidden_before_state(loaded, test_records, position)
        y_train = torch.tensor([STATES.index(r["answer"]) for r in fitted])
        y_test = torch.tensor([STATES.index(r["answer"]) for r in scored])
        probe = fit_linear_probe(x_train, y_train, len(STATES))
        with torch.no_grad():
            accuracy = (probe(x_test).argmax(-1) == y_test).float().mean().item()
        commonest = torch.bincount(y_train, minlength=len(STATES)).argmax()
        result[position] = {
            "probe_accuracy": round(accuracy, 4),
            "commonest_state_accuracy": round((y_test == commonest).float().mean().item(), 4),
            "train": len(fitted), "test": len(scored),
        }  # fmt: skip
        log.info("state probe at the %s position: %s", position, result[position])
    return result
