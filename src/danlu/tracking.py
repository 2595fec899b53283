"""Run metrics: a JSON Lines log, TensorBoard when installed, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"


class Tracker:
    """Metrics to OUTPUT/metrics.jsonl and, when enabled and installed, OUTPUT/tb (TensorBoard).

    On resume (``start_step`` > 0) entries after the checkpoint, written by the interrupted run,
    are dropped so the log reads as one uninterrupted run.
    """

    def __init__(self, out: Path, tensorboard: bool, start_step: int = 0) -> None:
        path = out / METRICS
        if start_step and path.exists():
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step
            ]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(
                    str(out / "tb"), purge_step=start_step + 1 if start_step else None
                )
            except ImportError:
                log.warning("tensorboard is not installed; logging to %s only", METRICS)

    def log(self, step: int, **metrics: float) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer:
            self.writer.close()


def plot_losses(out: Path) -> Path | None:
    """Draw OUTPUT/loss.png from the metrics log (train loss, and eval loss when logged)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = [
        json.loads(line) for line in (out / METRICS).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path)
    return path
