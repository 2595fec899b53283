"""Run metrics: a JSON Lines log, TensorBoard, optionally wandb/mlflow, and a loss-curve PNG.

None of the cloud loggers is required: ``output.report_to`` names the ones to use, and a named
one that is not installed is a one-line error before training starts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from danlu.errors import UserError

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"


class Tracker:
    """Metrics to OUTPUT/metrics.jsonl and, when enabled and installed, OUTPUT/tb (TensorBoard).

    On resume (``start_step`` > 0) entries after the checkpoint, written by the interrupted run,
    are dropped so the log reads as one uninterrupted run.
    """

    def __init__(
        self,
        out: Path,
        tensorboard: bool,
        start_step: int = 0,
        report_to: list[str] = (),
        config: dict | None = None,
    ) -> None:
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
        self.wandb = self.mlflow = None
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project="danlu", name=out.name, config=config, resume="allow")
        if "mlflow" in report_to:
            import mlflow

            mlflow.start_run(run_name=out.name)
            mlflow.log_params({k: str(v) for k, v in _flat(config or {}).items()})
            self.mlflow = mlflow

    def log(self, step: int, **metrics: float) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step=step)

    def log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        """Generated answers (``{"prompt", "answer"}``) at ``step``."""
        self.file.write(json.dumps({"step": step, "samples": samples}, ensure_ascii=False) + "\n")
        self.file.flush()
        text = "\n\n".join(f"**{s['prompt']}**\n\n{s['answer']}" for s in samples)
        if self.writer:
            self.writer.add_text("samples", text, step)
        if self.wandb:
            self.wandb.log({"samples": text}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()
        if self.mlflow:
            self.mlflow.end_run()


class NullTracker:
    """What processes other than rank 0 log to: nothing."""

    def log(self, step: int, **metrics: float) -> None:
        pass

    def log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        pass

    def close(self) -> None:
        pass


def check_report_to(report_to: list[str]) -> None:
    """Fail early, naming the package, when a requested logger is not installed."""
    for name in report_to:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"output.report_to includes {name}, which is not installed: pip install {name}")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def plot_losses(out: Path) -> Path | None:
    """Draw OUTPUT/loss.png from the metrics log: train loss, and eval loss when logged; for the
    preference objectives a second panel with the pair accuracy (and the reward margin)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = [
        json.loads(line) for line in (out / METRICS).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]  # sample rows carry no loss
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    accuracy = [(r["step"], r["rewards_accuracy"]) for r in rows if "rewards_accuracy" in r]
    margin = [(r["step"], r["rewards_margin"]) for r in rows if "rewards_margin" in r]
    if not train:
        return None
    fig = Figure(figsize=(7, 6.5 if accuracy else 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2, 1, 1) if accuracy else fig.add_subplot()
    ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if accuracy:
        _reward_panel(fig.add_subplot(2, 1, 2), accuracy, margin)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path)
    return path


def _reward_panel(ax: Any, accuracy: list[tuple[int, float]], margin: list[tuple[int, float]]) -> None:
    """Pair accuracy (left axis, 0 to 1) and reward margin (right axis) per step."""
    ax.plot(*zip(*accuracy, strict=True), color="tab:green", label="reward accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("reward accuracy")
    ax.grid(alpha=0.3)
    if margin:
        right = ax.twinx()
        right.plot(*zip(*margin, strict=True), color="tab:purple", alpha=0.7, label="reward margin")
        right.set_ylabel("reward margin")
        right.legend(loc="lower right")
    ax.legend(loc="upper left")
