"""DeepSpeed ZeRO-2 and ZeRO-3 as training strategies: a thin layer over DeepSpeed's engine.

DeepSpeed is an optional extra (``pip install 'danlu[deepspeed]'``), imported only when
``train.strategy`` is ``zero2`` or ``zero3``. danlu's loop stays what it is; the engine takes over
only what ZeRO must own:

- :func:`initialize` builds DeepSpeed's config from danlu's and puts the model and danlu's own
  torch optimizer under the engine (ZeRO-2 partitions gradients and optimizer state over the
  processes, ZeRO-3 the weights too);
- :func:`backward` runs a micro-batch's backward through the engine, which reduces the gradients
  and, after the step's last micro-batch, clips them and updates the weights;
- :func:`gather` collects the (partitioned) weights for checkpoints and the final save;
- :func:`save` and :func:`load` write and read DeepSpeed's own checkpoint, every rank its part.

The engine runs in fp32 mode: weights keep the dtype danlu loaded them in and, on a GPU, bf16
compute comes from autocast, as on one GPU, so the saved adapter or model is the same as one
process's. Gradients are reduced (and ZeRO-3 weights gathered) in the weights' own dtype. The loss is danlu's (the mean over the trained tokens of the global batch, scaled by
the number of processes because the gradients are averaged over them); DeepSpeed is told not to
divide it by the accumulation steps a second time.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from danlu.config import Config
from danlu.errors import UserError

STAGES = {"zero2": 2, "zero3": 3}
TAG = "zero"  # DeepSpeed's name for the one state it writes in a checkpoint's deepspeed/ folder


def require(strategy: str) -> None:
    """Stop with the install command when DeepSpeed is missing."""
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"train.strategy={strategy} needs DeepSpeed: pip install 'danlu[deepspeed]' "
            "(or use train.strategy=ddp or fsdp)"
        )


def check(cfg: Config, strategy: str, dtype: torch.dtype) -> None:
    """Combinations the ZeRO strategies cannot run, refused before loading anything."""
    require(strategy)
    if dtype == torch.float16:
        raise UserError(f"train.strategy={strategy} trains in bf16 or fp32; set train.precision=bf16")
    if cfg.model.quantization != "none":
        raise UserError(
            f"model.quantization={cfg.model.quantization} cannot be partitioned with "
            f"train.strategy={strategy}; use train.strategy=ddp for QLoRA"
        )
    if cfg.train.optimizer not in ("adamw", "sgd"):
        raise UserError(
            f"train.optimizer={cfg.train.optimizer} is not supported with train.strategy={strategy}; "
            "use adamw (ZeRO already partitions the optimizer state over the processes)"
        )


def ds_config(cfg: Config, stage: int, autocast: torch.dtype | None = None) -> dict[str, Any]:
    """DeepSpeed's config for danlu's: batch, accumulation, clipping, ZeRO stage, offload, and
    the ``autocast`` dtype of the loop's compute (None: none)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": stage}
    if t.fsdp_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,  # 0: off, as in danlu
        "zero_optimization": zero,
        # danlu's torch optimizer, not DeepSpeed's compiled ones: nothing to build at install
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31,  # danlu logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if autocast is not None:
        # the engine's forward turns off an autocast it was not told of; no module is "safe" to
        # communicate in lower precision, so gradients are reduced in fp32 as on one GPU
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": str(autocast).removeprefix("torch."),
            "lower_precision_safe_modules": [],
        }
    return config


def initialize(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, autocast: torch.dtype | None
) -> Any:
    """The DeepSpeed engine over ``model`` and ``optimizer`` (a collective: every rank calls it);
    ``autocast`` is the dtype the loop computes in under autocast, None without.

    The engine's optimizer wraps ``optimizer`` and keeps its parameter groups, so a learning-rate
    scheduler made on ``optimizer`` still sets the rate the updates use.
    """
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    config = ds_config(cfg, STAGES[cfg.train.strategy], autocast)
    if config["zero_optimization"]["stage"] == 3:
        # partition the CPU copy one weight at a time, so no GPU ever holds the whole model
        deepspeed.zero.Init(module=model, config_dict_or_path=config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def backward(engine: Any, loss: torch.Tensor) -> None:
    """One micro-batch: backward through the engine, then ``engine.step()``, which only counts the
    micro-batch until the last of the step, where it clips and updates."""
    engine.backward(loss, scale_wrt_gas=False)  # danlu's loss is already the step's mean
    engine.step()


def grad_norm(engine: Any) -> float:
    """The gradient norm of the last update, before clipping."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def gather(engine: Any, main: bool, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Whole weights (and persistent buffers) on rank 0's CPU; a collective under ZeRO-3, where
    every rank must call it. Other ranks get an empty dict.

    Tied weights appear once, under the name ``named_parameters`` gives them, as the model's own
    ``state_dict`` would save them.
    """
    from deepspeed import zero

    module = engine.module
    keep = set(module.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        with zero.GatheredParameters([p]):  # a no-op for ZeRO-2's whole weights
            if main:
                state[name] = p.detach().to("cpu", copy=True)
    if not trainable_only and main:
        state.update({n: b.detach().cpu() for n, b in module.named_buffers() if n in keep})
    return {k: v for k, v in state.items() if k in keep} if main else {}


def save(engine: Any, folder: Path) -> None:
    """DeepSpeed's checkpoint (each rank's partitions of weights and optimizer state) into
    ``folder``; every rank must call it. Frozen weights are left out: they never change."""
    engine.save_checkpoint(str(folder), tag=TAG, save_latest=False, exclude_frozen_parameters=True)


def load(engine: Any, folder: Path) -> None:
    """Restore what :func:`save` wrote: trainable weights and optimizer state, on every rank."""
    if not (folder / TAG).is_dir():
        raise UserError(f"--resume: {folder.parent.name} holds no DeepSpeed state; start a new output.dir")
    path, _ = engine.load_checkpoint(
        str(folder), tag=TAG, load_module_strict=False, load_lr_scheduler_states=False
    )
    if path is None:
        raise UserError(f"--resume: DeepSpeed could not read {folder}; start a new output.dir")
