"""Learning-curve PNGs from a run's metrics.csv (SFT loss, GRPO rewards)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    rows = []
    with Path(path).open(newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows


def _series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training(metrics_csv: str | Path, out: str | Path, stage: str = "sft") -> Path | None:
    """SFT: loss (and token accuracy, learning rate). RFT: total and per-function rewards, KL, completion length."""
    path = Path(metrics_csv)
    if not path.is_file():
        return None
    rows = read_metrics(path)
    if not rows:
        return None
    if stage == "sft":
        panels = [("loss", ["loss"]), ("token accuracy", ["mean_token_accuracy"]), ("learning rate", ["learning_rate"])]
    else:
        keys = sorted({k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
        panels = [
            ("reward", ["reward", *keys]),
            ("KL to reference", ["kl"]),
            ("completion length", ["completions/mean_length"]),
        ]
    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            x, y = _series(rows, key)
            ax.plot(x, y, label=key.removeprefix("rewards/").removesuffix("/mean"), linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"{stage.upper()} - {path.parent.name}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_confusion(labels: list[str], matrix: list[list[int]], out: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (truth rows, prediction columns) with counts in the cells."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if m[i, j]:
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
