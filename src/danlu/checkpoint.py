"""Checkpoints: written atomically, found again, and restored for an exact resume.

``OUTPUT/checkpoint-STEP`` holds the adapter (standard PEFT files; for full and freeze tuning,
the trainable parameters in ``trainable.pt``) and ``trainer_state.pt``:
optimizer, schedule, gradient scaler, step and every random-number generator's state. The
data order is a pure function of (seed, epoch), so a resumed run skips the micro-batches it
has seen and continues exactly where the checkpoint left off, dropout masks included.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "checkpoint-"
STATE = "trainer_state.pt"
TRAINABLE = "trainable.pt"


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def atomic_dir(target: Path, write: Callable[[Path], Any]) -> None:
    """Write into a temporary sibling folder, then rename: a crash never leaves half a folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def save(model: Any, optimizer: Any, scheduler: Any, scaler: Any, out: Path, step: int, keep: int) -> Path:
    """Write OUTPUT/checkpoint-STEP and keep only the last ``keep`` checkpoints."""
    target = out / f"{PREFIX}{step}"

    def write(tmp: Path) -> None:
        if _is_peft(model):
            model.save_pretrained(tmp)
        else:  # full/freeze: only what trains; tied weights are fine in torch.save
            torch.save(
                {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, tmp / TRAINABLE
            )
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _rng_state(),
        }
        torch.save(state, tmp / STATE)

    atomic_dir(target, write)
    for old in all_checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return target


def restore(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> int:
    """Load a checkpoint into the live objects; returns the step it was taken after."""
    device = next(model.parameters()).device
    if _is_peft(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(
            model, load_file(str(path / "adapter_model.safetensors"), device=str(device))
        )
    else:
        saved = torch.load(path / TRAINABLE, map_location=device)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
    state = torch.load(path / STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return int(state["step"])
