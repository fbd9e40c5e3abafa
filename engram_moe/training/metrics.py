"""Run metrics: a JSON-lines log (one record per logged step or evaluation) and the loss-curve plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    """Appends JSON records to `path`; `truncate_after(step)` drops records of steps a resumed run redoes."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
            f.flush()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curves(
    runs: dict[str, str | os.PathLike] | str | os.PathLike,
    png_path: str | os.PathLike,
    title: str | None = None,
) -> Path | None:
    """Plot train and validation loss against tokens seen for one run's `metrics.jsonl` or several.

    `runs` is a metrics path or `{label: metrics path}`. Returns the PNG path, or None without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not isinstance(runs, dict):
        runs = {"": runs}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, path) in enumerate(runs.items()):
        records = read_metrics(path)
        color = colors[i % len(colors)]
        prefix = f"{label} " if label else ""
        train = [r for r in records if "loss" in r and math.isfinite(r["loss"])]
        val = [r for r in records if "val_loss" in r]
        if train:
            ax.plot(
                [r["tokens"] for r in train],
                [r["loss"] for r in train],
                color=color,
                alpha=0.55,
                lw=1,
                label=f"{prefix}train",
            )
        if val:
            ax.plot(
                [r["tokens"] for r in val],
                [r["val_loss"] for r in val],
                color=color,
                marker="o",
                ms=3,
                lw=1.6,
                label=f"{prefix}validation",
            )
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
