"""Stage 0: vision pre-training on dense ground truth, before the paper's SFT and GRPO stages.

A real Surgery-R1 starts from Qwen2.5-VL, whose vision encoder was pre-trained on billions of images; a
random-init model has no such encoder, and when SFT trains everything at once the language model learns the
answer priors first and the vision side drifts into a near-constant output (the first built-in model went
blind this way: see ``shared/ENVIRONMENT.md``). This stage plays the part of that pre-training: the vision
tower (patch embedding, blocks and merger, i.e. exactly the tokens the language model will read) learns, with
a small per-token linear head, what the synthetic renderer's dense ground truth says about each merged
28x28-pixel cell:

- ``cover``: which instrument covers most of the cell (or none); ``organ``: the share of organ pixels;
- ``tip``: which instrument's working end is within ``TIP_RADIUS`` cells, and its ``state`` there;
- ``tool_state``: the covering instrument's state on every cell it covers, so that any of a tool's tokens
  says its state, as ``quadrant`` and ``box`` say its place (with the state at the tip cells alone, SFT
  answered state questions from the tool's prior: 0.365 with the true frames, 0.352 with swapped ones);
- ``quadrant`` and ``box`` of the covering instrument's label box; ``pos``: the cell's own row and column
  (the tower has no absolute position embedding, so it must read position from the picture itself).

The head is training-only: the saved model is the plain ``Qwen2_5_VLForConditionalGeneration`` with the
trained tower. The loop is the transformers ``Trainer`` (checkpoints, resume, time budget) around a small
``nn.Module`` (tower + head); no TRL trainer fits a dense per-token objective.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from surgery_r1_ros.boxes import Size
from surgery_r1_ros.data.synth import DENSE_DIR, ORGAN_LABEL
from surgery_r1_ros.model.processor import MERGE_SIZE, PATCH_SIZE, pixel_values_from_array, resize_frame
from surgery_r1_ros.vocab import INSTRUMENTS, QUADRANTS, STATES

from .augment import augment

log = logging.getLogger(__name__)

CELL = PATCH_SIZE * MERGE_SIZE  # pixels per side of one merged image token
TIP_RADIUS = 1.5  # cells: how close a cell's centre must be to a tip to carry that tool's identity and state
COVER_SHARE = 0.2  # an instrument covers a cell when it holds at least this share of its pixels
IGNORE = -100
N_LABELS = ORGAN_LABEL + 1
# Output slices of the per-token head, in order.
HEAD: dict[str, int] = {
    "cover": len(INSTRUMENTS) + 1,
    "tip": len(INSTRUMENTS) + 1,
    "state": len(STATES),
    "tool_state": len(STATES),
    "quadrant": len(QUADRANTS),
    "box": 4,
    "organ": 1,
    "pos": 2,
}
MASKED = ("state", "tool_state", "quadrant")  # class targets set only on some cells (IGNORE elsewhere)
READ = ("read_quadrant", "read_tool_state")  # per instrument, read off the head (read_instruments)


@dataclass(frozen=True)
class DenseFrame:
    """One frame of a synthetic dataset with its dense sidecar."""

    image: Path
    mask: Path
    record: Path


def dense_frames(root: str | Path) -> list[DenseFrame]:
    """Every frame under ``root`` (``seq_*/left_frames``) that has a dense sidecar."""
    root = Path(root)
    frames = []
    for mask in sorted(root.glob(f"seq_*/vqla/{DENSE_DIR}/*.png")):
        image = mask.parents[2] / "left_frames" / mask.name
        if image.is_file():
            frames.append(DenseFrame(image, mask, mask.with_suffix(".json")))
    if not frames:
        raise FileNotFoundError(
            f"{root}: no frames with dense ground truth (seq_*/vqla/{DENSE_DIR}/*.png); "
            "vision pre-training needs a dataset written by `surgery-r1 data synth`"
        )
    return frames


def cell_targets(mask: np.ndarray, record: dict, size: Size) -> dict[str, np.ndarray]:
    """Per-cell targets (row-major cells, the merger's token order) for a mask at model size ``size``."""
    w, h = size
    gw, gh = w // CELL, h // CELL
    sx, sy = w / record["size"][0], h / record["size"][1]
    cell = (np.arange(h)[:, None] // CELL) * gw + (np.arange(w)[None, :] // CELL)
    counts = np.bincount((cell * N_LABELS + mask.astype(np.int64)).ravel(), minlength=gw * gh * N_LABELS)
    share = counts.reshape(gw * gh, N_LABELS) / float(CELL * CELL)
    tools = share[:, 1:ORGAN_LABEL]
    best = tools.argmax(axis=1)
    cover = np.where(tools.max(axis=1) >= COVER_SHARE, best + 1, 0)

    cols, rows = np.meshgrid(np.arange(gw), np.arange(gh))
    centres = np.stack([(cols.ravel() + 0.5) * CELL, (rows.ravel() + 0.5) * CELL], axis=1)
    tip = np.zeros(gw * gh, np.int64)
    state = np.full(gw * gh, IGNORE, np.int64)
    tool_state = np.full(gw * gh, IGNORE, np.int64)
    quadrant = np.full(gw * gh, IGNORE, np.int64)
    box = np.zeros((gw * gh, 4), np.float32)
    nearest = np.full(gw * gh, np.inf)
    for inst in record["instruments"]:
        label = INSTRUMENTS.index(inst["name"]) + 1
        distance = np.hypot(*(centres - [inst["tip"][0] * sx, inst["tip"][1] * sy]).T) / CELL
        near = (distance <= TIP_RADIUS) & (distance < nearest)
        nearest[near] = distance[near]
        tip[near] = label
        state[near] = STATES.index(inst["state"])
        covered = cover == label
        tool_state[covered] = STATES.index(inst["state"])
        quadrant[covered] = QUADRANTS.index(inst["quadrant"])
        x1, y1, x2, y2 = inst["box"]
        box[covered] = [x1 * sx / w, y1 * sy / h, x2 * sx / w, y2 * sy / h]
    pos = np.stack([(cols.ravel() + 0.5) / gw, (rows.ravel() + 0.5) / gh], axis=1).astype(np.float32)
    return {
        "cover": cover.astype(np.int64),
        "tip": tip,
        "state": state,
        "tool_state": tool_state,
        "quadrant": quadrant,
        "box": box,
        "organ": share[:, ORGAN_LABEL].astype(np.float32),
        "pos": pos,
    }


class DenseDataset(torch.utils.data.Dataset):
    """Frames resized to the model's size (augmented when training), their pixel values and cell targets."""

    def __init__(self, frames: list[DenseFrame], processor, train: bool, seed: int = 0) -> None:
        from surgery_r1_ros.model import image_size

        self.frames, self.processor, self.train = frames, processor, train
        self.size = image_size(processor)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        frame = self.frames[index]
        image = cv2.cvtColor(cv2.imread(str(frame.image), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        mask = cv2.imread(str(frame.mask), cv2.IMREAD_UNCHANGED)
        w, h = self.size
        if image.shape[:2] != (h, w):
            image = resize_frame(image, (w, h))  # the processor's and the runtime's resize
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        if self.train:
            image = augment(image, self.rng)
        record = json.loads(frame.record.read_text())
        return {"pixel_values": pixel_values_from_array(image, self.processor), **cell_targets(mask, record, self.size)}


def masked_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the cells whose target is set; zero (still in the graph) when none is."""
    if (target != IGNORE).any():
        return nn.functional.cross_entropy(logits, target, ignore_index=IGNORE)
    return logits.sum() * 0.0


def tower_tokens(visual: nn.Module, pixel_values: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """The merger's output tokens (cells x hidden, frame after frame) for frames of ``grid_hw`` patches."""
    patches = grid_hw[0] * grid_hw[1]
    grid = torch.tensor([[1, *grid_hw]] * (pixel_values.shape[0] // patches), device=pixel_values.device)
    return visual(pixel_values, grid_thw=grid).pooler_output


class DenseVisionModel(nn.Module):
    """The vision tower with a per-token linear head and the dense losses (training only)."""

    def __init__(self, visual: nn.Module, hidden: int, grid_hw: tuple[int, int]) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(hidden, sum(HEAD.values()))
        self.grid_hw = grid_hw

    def outputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs per target name, one row per cell."""
        out = self.head(tower_tokens(self.visual, pixel_values, self.grid_hw))
        return dict(zip(HEAD, out.split(list(HEAD.values()), dim=-1), strict=True))

    def forward(self, pixel_values: torch.Tensor, **targets: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.outputs(pixel_values)
        ce = nn.functional.cross_entropy
        covered = (targets["quadrant"] != IGNORE).float().unsqueeze(-1)
        losses = {
            "cover": ce(out["cover"], targets["cover"]),
            "tip": ce(out["tip"], targets["tip"]),
            **{k: masked_ce(out[k], targets[k]) for k in MASKED},
            "box": (nn.functional.smooth_l1_loss(out["box"].sigmoid(), targets["box"], reduction="none", beta=0.05)
                    * covered).sum() / covered.sum().clamp(min=1.0) / 4,
            "organ": nn.functional.binary_cross_entropy_with_logits(out["organ"].squeeze(-1), targets["organ"]),
            "pos": nn.functional.mse_loss(out["pos"].sigmoid(), targets["pos"]) * 10,
        }  # fmt: skip
        return {"loss": sum(losses.values()), **{f"loss_{k}": v.detach() for k, v in losses.items()}}


def grid_of(processor) -> tuple[int, int]:
    """(grid_h, grid_w) in patches of the model's fixed input size."""
    from surgery_r1_ros.model import image_size

    w, h = image_size(processor)
    return h // PATCH_SIZE, w // PATCH_SIZE


def dense_collate(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Concatenate the frames' patches (Qwen2-VL's flat layout) and their cells."""
    return {k: torch.from_numpy(np.concatenate([r[k] for r in rows])) for k in rows[0]}


def read_instruments(
    pred: dict[str, np.ndarray], truth: dict[str, np.ndarray], cells: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each instrument's quadrant and state as read off the head alone, against its true ones.

    Per frame (``cells`` rows each) and per instrument that covers at least one cell: the majority
    ``quadrant`` and ``tool_state`` over the cells the head says that instrument covers (no such cell: a
    miss). What the head alone reads, to set beside the language model's location and state accuracy (a reader
    that attends reads more: ``reader_probe.py``). Returns, per target, whether each instrument was read
    right and its true value.
    """
    found: dict[str, list[tuple[bool, int]]] = {"quadrant": [], "tool_state": []}
    for start in range(0, len(truth["cover"]), cells):
        frame = slice(start, start + cells)
        for label in np.unique(truth["cover"][frame]):
            if label == 0:
                continue
            own = truth["cover"][frame] == label
            claimed = pred["cover"][frame] == label
            for name in found:
                true_value = int(truth[name][frame][own][0])
                votes = pred[name][frame][claimed]
                guess = int(np.bincount(votes).argmax()) if votes.size else -1
                found[name].append((guess == true_value, true_value))
    return {name: (np.array([r[0] for r in rows], bool), np.array([r[1] for r in rows], np.int64))
            for name, rows in found.items()}  # fmt: skip


@torch.inference_mode()
def dense_metrics(model: DenseVisionModel, dataset: DenseDataset, batch_size: int = 32) -> dict[str, float]:
    """Held-out per-cell scores, each beside the score of always guessing the most common value."""
    model.eval()
    hits: dict[str, list[np.ndarray]] = {k: [] for k in ("cover", "tool_cover", "tip", *MASKED, *READ)}
    truths: dict[str, list[np.ndarray]] = {k: [] for k in hits}
    pos_err, box_err = [], []
    cells = model.grid_hw[0] * model.grid_hw[1] // MERGE_SIZE**2
    for start in range(0, len(dataset), batch_size):
        batch = dense_collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out = model.outputs(batch["pixel_values"])
        pred = {k: out[k].argmax(-1).numpy() for k in ("cover", "tip", *MASKED)}
        t = {k: batch[k].numpy() for k in ("cover", "tip", *MASKED)}
        tool = t["cover"] > 0
        for name, sel in (("cover", slice(None)), ("tool_cover", tool), ("tip", t["tip"] > 0)):
            key = "tip" if name == "tip" else "cover"
            hits[name].append(pred[key][sel] == t[key][sel])
            truths[name].append(t[key][sel])
        for name in MASKED:
            sel = t[name] != IGNORE
            hits[name].append(pred[name][sel] == t[name][sel])
            truths[name].append(t[name][sel])
        for name, (right, values) in read_instruments(pred, t, cells).items():
            hits[f"read_{name}"].append(right)
            truths[f"read_{name}"].append(values)
        pos_err.append(np.abs(out["pos"].sigmoid().numpy() - batch["pos"].numpy()).mean(axis=1))
        box_err.append(np.abs(out["box"].sigmoid().numpy() - batch["box"].numpy())[tool].mean(axis=1))
    model.train()
    result: dict[str, float] = {}
    for name in hits:
        truth = np.concatenate(truths[name])
        result[f"{name}_acc"] = float(np.concatenate(hits[name]).mean()) if truth.size else 0.0
        result[f"{name}_majority"] = float(np.bincount(truth).max() / truth.size) if truth.size else 0.0
    result["pos_mae"] = float(np.concatenate(pos_err).mean())
    result["box_mae"] = float(np.concatenate(box_err).mean())
    result["cells"] = int(sum(len(h) for h in hits["cover"]))
    return result


def run_vision_pretrain(
    start: str | Path,
    train_data: str | Path,
    test_data: str | Path,
    output_dir: str | Path,
    trainer: dict,
    resume: bool = False,
    callbacks=(),
    eval_frames: int = 300,
    seed: int = 0,
) -> dict:
    """Train ``start``'s vision tower on the dense targets; save the whole model to ``output_dir/final``.

    ``trainer`` is passed to ``transformers.TrainingArguments``. Returns the held-out dense metrics (before
    and after), the step count and the final folder.
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from surgery_r1_ros.model import load_model, save_model

    from .common import FINAL_DIR, METRICS_CSV, MetricsCSV, checkpoint_step, trainer_defaults

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = get_last_checkpoint(str(output_dir)) if resume else None
    loaded = load_model(start, device="cpu")
    net = DenseVisionModel(loaded.model.model.visual, loaded.model.config.vision_config.out_hidden_size,
                           grid_of(loaded.processor))  # fmt: skip
    torch.manual_seed(seed)
    net.head.reset_parameters()
    test_frames = dense_frames(test_data)
    test_frames = test_frames[:: max(1, len(test_frames) // eval_frames)][:eval_frames]
    test_set = DenseDataset(test_frames, loaded.processor, train=False)
    before = dense_metrics(net, test_set)
    train_set = DenseDataset(dense_frames(train_data), loaded.processor, train=True, seed=seed)
    args = TrainingArguments(**{**trainer_defaults(str(output_dir)), **trainer})
    run = Trainer(
        model=net,
        args=args,
        train_dataset=train_set,
        data_collator=dense_collate,
        callbacks=[MetricsCSV(output_dir / METRICS_CSV, checkpoint_step(checkpoint)), *callbacks],
    )
    log.info("vision pre-training: %d frames, %d held-out; %s", len(train_set), len(test_set), loaded.processor
             .image_processor.fixed_width_height())  # fmt: skip
    run.train(resume_from_checkpoint=checkpoint)
    after = dense_metrics(net, test_set)
    log.info("vision pre-training held-out: %s", json.dumps({k: round(v, 3) for k, v in after.items()}))
    final = output_dir / FINAL_DIR
    save_model(loaded, final, {"trained": True, "note": "stage 0: vision tower pre-trained on dense targets"})
    return {"final": str(final), "steps": run.state.global_step, "before": before, "after": after}
