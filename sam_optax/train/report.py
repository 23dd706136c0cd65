"""The end-of-job report: ``report.md`` (tables) and ``curves.png``.

Both are made from the rows of ``metrics.jsonl`` alone, so a report can be
rebuilt for any work directory: ``python -m sam_optax.train.report DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

_COLUMNS = (("epoch", "epoch", "{:d}"), ("train_loss", "train loss", "{:.4f}"),
            ("train_accuracy", "train acc.", "{:.2%}"),
            ("val_accuracy", "val acc.", "{:.2%}"),
            ("test_accuracy", "test acc.", "{:.2%}"),
            ("sharpness", "sharpness L(w+ε)−L(w)", "{:.4f}"),
            ("grad_norm", "‖g‖", "{:.3f}"),
            ("perturbed_fraction", "2nd gradient paid", "{:.0%}"),
            ("time_step_ms", "ms/step", "{:.2f}"))


def _table(rows: Sequence[dict]) -> list[str]:
    columns = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(
            c[2].format(row[c[0]]) if c[0] in row else "–" for c in columns)
            + " |")
    return lines


def markdown(rows: Sequence[dict], config: dict[str, Any]) -> str:
    """The report: the job in one line, the final epoch, every k-th epoch."""
    optimizer = config.get("optimizer", "?")
    hyper = config.get(optimizer, {}) if optimizer != "sgd" else {}
    lines = [f"# {optimizer} on {config.get('dataset')}", "",
             f"Model {config.get('model')}, base {config.get('base_optimizer')} "
             f"(lr {config.get('learning_rate')}, {config.get('lr_schedule')}), "
             f"batch {config.get('batch_size')}, {config.get('num_epochs')} "
             f"epochs, label noise {config.get('label_noise', 0):.0%}, seed "
             f"{config.get('seed')}"
             + (", " + ", ".join(f"{k}={v}" for k, v in hyper.items())
                if hyper else "") + ".", ""]
    if not rows:
        return "\n".join(lines + ["No epoch finished.", ""])
    best = max(rows, key=lambda r: r.get("val_accuracy", r.get("test_accuracy", 0)))
    lines += ["## Final epoch", ""] + _table(rows[-1:])
    lines += ["", f"Best validation accuracy at epoch {best['epoch']}.", "",
              "## Curves", "", "![curves](curves.png)", "", "## Epochs", ""]
    stride = max(1, len(rows) // 20)
    shown = [r for i, r in enumerate(rows)
             if i % stride == 0 or i == len(rows) - 1]
    return "\n".join(lines + _table(shown)) + "\n"


def plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """Training loss, accuracies and (for SAM) sharpness against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    has_sam = any("sharpness" in r for r in rows)
    fig = Figure(figsize=(12 if has_sam else 8, 3.6), layout="constrained")
    axes = fig.subplots(1, 3 if has_sam else 2)
    axes[0].plot(epochs, [r["train_loss"] for r in rows])
    axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log",
                title="training loss (labels as given)")
    for key, label in (("train_accuracy", "train (labels as given)"),
                       ("val_accuracy", "validation"), ("test_accuracy", "test")):
        if any(key in r for r in rows):
            axes[1].plot(epochs, [100 * r.get(key, float("nan")) for r in rows],
                         label=label)
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    axes[1].legend()
    if has_sam:
        axes[2].plot(epochs, [r.get("sharpness", float("nan")) for r in rows])
        axes[2].set(xlabel="epoch", ylabel="L(w+ε) − L(w)",
                    title="SAM's measured sharpness")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)


def write(workdir: str, rows: Sequence[dict], config: dict[str, Any]) -> None:
    """Write ``report.md`` and ``curves.png`` into ``workdir``."""
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(markdown(rows, config))
    if rows:
        plot(rows, os.path.join(workdir, "curves.png"),
             f"{config.get('optimizer')} on {config.get('dataset')}")


def main(argv: Sequence[str]) -> None:
    (workdir,) = argv
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    write(workdir, rows, config)
    print(os.path.join(workdir, "report.md"))


if __name__ == "__main__":
    main(sys.argv[1:])
