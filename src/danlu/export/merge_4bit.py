"""Merging a QLoRA adapter: the 4-bit base it trained on, and the two bases it can be merged into.

A QLoRA adapter learned its update against 4-bit (nf4 / fp4) weights. Two merges are possible:

- ``original``: into the base's own 16-bit weights. Full precision, but not the model that was
  trained: each weight's quantization error is gone, and the adapter had learned around it.
- ``dequantized``: into the 4-bit weights turned back into 16-bit numbers. It computes what the
  trained model computed (up to the 4-bit kernel's rounding), and keeps the quantization error.

Which one is closer to what a user wants depends on the model and the data, so :func:`gap`
measures both distances on the merge's parity chats and the merge reports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from danlu import model as mdl
from danlu.config import CONFIG_FILENAME
from danlu.errors import UserError

BASE_PRECISIONS = ("original", "dequantized")
FOUR_BIT = ("nf4", "fp4")


@dataclass
class Gap:
    """How far one model's logits are from another's over the same prompts."""

    mean: float  # mean |Δlogit| over every prompt position and vocabulary entry
    max: float  # largest |Δlogit|
    agree: float  # share of prompt positions whose most likely next token is the same

    def __str__(self) -> str:
        return (
            f"mean |Δlogit| {self.mean:.3g} (max {self.max:.3g}), "
            f"same next token at {self.agree:.1%} of positions"
        )


def gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> Gap:
    """:class:`Gap` between two lists of per-prompt logits (positions × vocabulary)."""
    diffs = [(x - y).abs() for x, y in zip(a, b, strict=True)]
    positions = sum(d.shape[0] for d in diffs)
    same = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b, strict=True))
    return Gap(
        mean=float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs)),
        max=float(max(d.max() for d in diffs)),
        agree=same / positions,
    )


def trained_quantization(adapter: Path) -> tuple[str, bool] | None:
    """``(kind, double_quant)`` when the adapter's run trained on a 4-bit base, read from the run
    config saved next to it (``OUTPUT/danlu_config.yaml``); None otherwise or without one."""
    config = adapter.parent / CONFIG_FILENAME
    if not config.is_file():
        return None
    import yaml

    section = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("model") or {}
    kind = section.get("quantization")
    return (kind, bool(section.get("double_quant", True))) if kind in FOUR_BIT else None


def check_base_precision(choice: str, adapter: Path, quant: tuple[str, bool] | None) -> None:
    """Refuse ``dequantized`` for an adapter that did not train on a 4-bit base."""
    if choice not in BASE_PRECISIONS:
        raise UserError(f"--base-precision {choice}: choose one of {', '.join(BASE_PRECISIONS)}")
    if choice == "dequantized" and quant is None:
        raise UserError(
            f"--base-precision dequantized: {adapter.parent / CONFIG_FILENAME} does not say the run trained "
            "on a 4-bit base (model.quantization nf4 or fp4); it applies to QLoRA adapters only"
        )


def load_4bit(
    ref: str, quant: tuple[str, bool], dtype: torch.dtype, device: str, trust_remote_code: bool
) -> Any:
    """The base quantized as the run quantized it, on the path training ran (no CPU repack)."""
    kind, double_quant = quant
    config = mdl.quantization_config(kind, dtype, double_quant)
    # training=True keeps every layer off bitsandbytes' AVX512-BF16 CPU repack, as training did,
    # and leaves the packed weights in the layout dequantize_4bit reads
    return mdl.load_model(ref, dtype, device, trust_remote_code, quantization=config, training=True)


@torch.no_grad()
def dequantize_into(target: Any, quantized: Any) -> int:
    """Copy each 4-bit linear layer's weight, dequantized, into the layer of the same name in
    ``target`` (the same architecture in 16 or 32 bits); returns how many layers were copied."""
    import bitsandbytes as bnb

    layers = dict(target.named_modules())
    copied = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dest = layers[name].weight
            dest.copy_(weight.reshape(dest.shape).to(dest.dtype))
            copied += 1
    return copied


def describe_gaps(kind: str, dtype: torch.dtype, base_precision: str, gaps: dict[str, Gap]) -> str:
    """What a QLoRA merge gave, in a few lines: which base, how far from each reference, the other choice."""
    bits = str(dtype).removeprefix("torch.")
    if base_precision == "dequantized":
        into = f"its {kind} weights dequantized to {bits}"
        other = (
            f"--base-precision original keeps the {bits} weights: about the second distance from this merge"
        )
    else:
        into = f"the original {bits} weights"
        other = (
            "--base-precision dequantized computes what was trained: about the first distance from this merge"
        )
    return "\n".join(
        [
            f"QLoRA adapter (trained on a {kind} base), merged into {into} (--base-precision {base_precision}):",
            f"  vs what was trained ({kind} base + adapter): {gaps['trained']}",
            f"  vs the {bits} base + adapter: {gaps['original']}",
            f"  {other}",
        ]
    )
