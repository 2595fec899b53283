"""Checkpoints: written atomically, found again, and restored for an exact resume.

``OUTPUT/checkpoint-STEP`` holds the trainable parameters in ``trainable.pt`` (for LoRA also as a
standard PEFT adapter folder, so any checkpoint can be chatted with) and ``trainer_state.pt``:
optimizer, schedule, gradient scaler, step and every random-number generator's state. Under
DeepSpeed ZeRO the weights and optimizer state are restored from DeepSpeed's own checkpoint in
``deepspeed/`` (each rank's partitions) instead. The data order is a pure function of (seed,
epoch), so a resumed run skips the micro-batches it has seen and continues exactly where the
checkpoint left off, dropout masks included.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danlu import distributed, zero
from danlu.errors import UserError
from danlu.files import atomic_dir

PREFIX = "checkpoint-"
STATE = "trainer_state.pt"
TRAINABLE = "trainable.pt"
ZERO = "deepspeed"


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_checkpoints(out: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    found = [p for p in out.glob(f"{PREFIX}*") if p.name[len(PREFIX) :].isdigit() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    out: Path,
    step: int,
    keep: int,
    world: distributed.World | None = None,
) -> Path:
    """Write OUTPUT/checkpoint-STEP and keep only the last ``keep`` checkpoints.

    Under several processes every rank calls this (FSDP2 gathers shards) and rank 0 writes;
    under ZeRO every rank first writes its partitions into a hidden folder, which rank 0 then
    moves into the checkpoint before it appears.
    """
    world = world or distributed.World()
    target = out / f"{PREFIX}{step}"
    trainable = distributed.trainable_state(model, world)
    staged = out / f".{target.name}-{ZERO}"
    optimizer_state = None
    if world.zero:
        if world.main and staged.exists():  # left by a run that stopped while writing it
            shutil.rmtree(staged)
        distributed.barrier(world)
        zero.save(model, staged)
        distributed.barrier(world)  # every rank's part is written before rank 0 moves the folder
    else:
        optimizer_state = distributed.optimizer_state(optimizer, model, world)
    if not world.main:
        return target
    plain = distributed.unwrap(model)

    def write(tmp: Path) -> None:
        if _is_peft(plain):  # a usable adapter folder, as the final one
            plain.save_pretrained(tmp, state_dict=trainable)
        torch.save(trainable, tmp / TRAINABLE)  # what restore reads, whatever the method (not ZeRO)
        if world.zero:
            os.replace(staged, tmp / ZERO)
        state = {
            "step": step,
            "processes": world.size,
            "strategy": world.strategy,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _rng_state(),
        }
        torch.save(state, tmp / STATE)

    atomic_dir(target, write)
    for old in all_checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return target


def restore(
    path: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    world: distributed.World | None = None,
) -> int:
    """Load a checkpoint into the live objects (on every rank); returns the step it was taken after."""
    world = world or distributed.World()
    state = torch.load(path / STATE, weights_only=False)
    if state.get("processes", 1) != world.size:
        raise UserError(
            f"--resume: {path.name} was written by {state.get('processes', 1)} processes, this run has "
            f"{world.size}; the global batch would change: resume with --nproc {state.get('processes', 1)}"
        )
    saved = state.get("strategy", "none")
    if (world.zero or saved in zero.STAGES) and saved != world.strategy:
        was = "auto" if saved == "none" else saved
        raise UserError(
            f"--resume: {path.name} was written under train.strategy={was}, this run uses "
            f"{world.strategy}; DeepSpeed checkpoints do not convert: set train.strategy={was}"
        )
    if world.zero:
        zero.load(model, path / ZERO)
    else:
        distributed.load_trainable(model, torch.load(path / TRAINABLE, map_location="cpu"))
        distributed.load_optimizer_state(optimizer, model, world, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return int(state["step"])
