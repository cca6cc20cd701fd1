"""Per-job artifacts beside the adapter: ``metrics.jsonl`` (one line per step/epoch/eval record) and ``loss.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_metrics(folder: Path, history: dict[str, list[Any]]) -> None:
    with (folder / "metrics.jsonl").open("w") as out:
        for step, loss in history.get("step_loss", []):
            out.write(json.dumps({"type": "train", "step": step, "loss": loss}) + "\n")
        for epoch, loss in history.get("epoch_loss", []):
            out.write(json.dumps({"type": "epoch", "epoch": epoch, "loss": loss}) + "\n")
        for step, loss in history.get("eval_loss", []):
            out.write(json.dumps({"type": "eval", "step": step, "loss": loss}) + "\n")


def write_loss_plot(folder: Path, history: dict[str, list[Any]]) -> None:
    """Training loss by step and evaluation loss at each epoch end, as the user plotted for the thesis."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    train = history.get("step_loss", [])
    if train:
        axes.plot([s for s, _ in train], [v for _, v in train], label="training loss", linewidth=1)
    evals = [(s, v) for s, v in history.get("eval_loss", []) if v is not None]
    if evals:
        axes.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (response tokens)")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    if train or evals:  # a legend without lines is a warning
        axes.legend()
    figure.tight_layout()
    figure.savefig(folder / "loss.png")
    plt.close(figure)


def write_all(folder: Path, history: dict[str, list[Any]]) -> None:
    write_metrics(folder, history)
    write_loss_plot(folder, history)
