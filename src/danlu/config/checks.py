"""Cross-field checks on a loaded config: what types alone cannot express.

:func:`validate` takes a :class:`~danlu.config.schema.Config` whose values already have their
declared types and raises a one-line :class:`UserError` (``config: ...``) at the first rule broken.
"""

from __future__ import annotations

from danlu.config.schema import Config
from danlu.errors import UserError


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    t = cfg.train
    checks = [
        (t.batch_size >= 1, "train.batch_size must be at least 1"),
        (t.grad_accum >= 1, "train.grad_accum must be at least 1"),
        (t.lr > 0, "train.lr must be positive, e.g. train.lr=2e-4"),
        (t.epochs > 0 or (t.max_steps or 0) > 0, "set train.epochs > 0 or train.max_steps > 0"),
        (t.max_steps is None or t.max_steps > 0, "train.max_steps must be positive (or null to use epochs)"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 turns clipping off)"),
        (t.log_every >= 1, "train.log_every must be at least 1"),
        (t.save_every >= 0, "train.save_every must be >= 0"),
        (t.eval_every >= 0, "train.eval_every must be >= 0"),
        (t.sample_every >= 0, "train.sample_every must be >= 0"),
        (t.freeze_layers >= 1, "train.freeze_layers must be at least 1"),
        (
            all(r in ("wandb", "mlflow") for r in cfg.output.report_to),
            "output.report_to takes wandb and/or mlflow",
        ),
        (
            t.method == "lora" or cfg.model.quantization == "none",
            f"model.quantization={cfg.model.quantization} needs train.method=lora (QLoRA); full and freeze train 16/32-bit weights",
        ),
        (t.save_total_limit >= 1, "train.save_total_limit must be at least 1"),
        (cfg.lora.r >= 1, "lora.r must be at least 1"),
        (0 <= cfg.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
        (cfg.data.max_seq_length >= 8, "data.max_seq_length must be at least 8"),
        (
            0 <= cfg.data.window_overlap < cfg.data.max_seq_length,
            "data.window_overlap must be at least 0 and less than data.max_seq_length",
        ),
        (
            not cfg.data.weights or len(cfg.data.weights) == len(cfg.data.path),
            "data.weights needs one weight per entry of data.path",
        ),
        (all(w > 0 for w in cfg.data.weights), "data.weights must be positive"),
        (0 <= cfg.data.eval_ratio < 1, "data.eval_ratio must be in [0, 1)"),
        (cfg.data.sample is None or cfg.data.sample > 0, "data.sample must be positive (or null for all)"),
        (cfg.data.num_proc >= 0, "data.num_proc must be >= 0 (0: one per core)"),
        (bool(cfg.output.dir), "output.dir must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"config: {message}")
