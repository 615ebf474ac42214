"""A run's metrics: one JSON object per line (metrics.jsonl) and a PNG of its curves.

Record kinds, all with "step":
    train   loss (mean over the steps since the previous record), accuracy on the training batches,
            lr, grad_norm, tokens_per_s, elapsed_s
    eval    loss, accuracy, seq_accuracy (every answer of a sequence right), and for byte-level
            language modelling bits_per_byte and perplexity
    length  an evaluation at one sequence length (induction heads): length, accuracy, sequences
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Appends records to `path`. On resume, records after the checkpoint's step are dropped
    first, so that the file reads as one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
    return records


def plot(records: list[dict], path: Path, title: str = "") -> Path:
    """Loss and accuracy against steps (and accuracy against length, if evaluated) as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    lengths = [r for r in records if r["kind"] == "length"]
    panels = 3 if lengths else 2
    fig = Figure(figsize=(5 * panels, 4), layout="constrained")
    ax_loss, ax_acc, *rest = fig.subplots(1, panels)

    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train")
    if evals:
        ax_loss.plot(
            [r["step"] for r in evals], [r["loss"] for r in evals], "o-", ms=3, label="eval"
        )
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    if train and min(r["loss"] for r in train) > 0:
        ax_loss.set_yscale("log")
    ax_loss.legend()

    ax_acc.plot(
        [r["step"] for r in train], [100 * r["accuracy"] for r in train], lw=1, label="train"
    )
    if evals:
        ax_acc.plot(
            [r["step"] for r in evals],
            [100 * r["accuracy"] for r in evals],
            "o-",
            ms=3,
            label="eval",
        )
    ax_acc.set(xlabel="step", ylabel="accuracy on answer positions (%)", title="accuracy")
    ax_acc.set_ylim(0, 101)
    ax_acc.legend()

    if lengths:
        (ax_len,) = rest
        last = max(r["step"] for r in lengths)
        pts = sorted((r["length"], r["accuracy"]) for r in lengths if r["step"] == last)
        ax_len.plot([math.log2(n) for n, _ in pts], [100 * a for _, a in pts], "o-")
        ax_len.set(
            xlabel="log2(sequence length)", ylabel="accuracy (%)", title=f"length (step {last})"
        )
        ax_len.set_ylim(0, 101)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
