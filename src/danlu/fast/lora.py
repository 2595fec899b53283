"""LoRA projections with fewer passes over memory than peft's forward.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` per layer: the input is cast to
the adapter's dtype, and the low-rank update is written, scaled and added as three separate
tensors of the output's size (for an MLP projection of an 8B model, 117 MB each at 4,096 tokens).
Here, run eagerly, the update goes into the base output inside one matmul (``addmm`` with
``alpha=scaling``); inside a compiled layer the update's add is fused by the compiler into the
kernel that reads the output next. Projections that read the same input (q/k/v, gate/up) share
one ``lora_A`` matmul over their concatenated ``A`` matrices. The adapter's parameters are peft's own (read, never replaced), so
what is trained and saved is unchanged. Anything this does not cover (DoRA and other variants,
several active adapters, merged or disabled adapters, dropout that differs between the
projections) runs through the module's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from danlu.fast.kernels import compute_dtype


@dataclass
class _Parts:
    base: Any
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    dropout: Any


def project(modules: list[Any], x: torch.Tensor) -> list[torch.Tensor]:
    """``[m(x) for m in modules]`` for LoRA-wrapped linear layers that share the input ``x``."""
    parts = [_parts(m) for m in modules]
    if any(p is None for p in parts):
        return [m(x) for m in modules]
    dropouts = {type(p.dropout) for p in parts}
    if len(modules) > 1 and dropouts != {torch.nn.Identity}:
        return [project([m], x)[0] for m in modules]  # each its own dropout mask, as peft draws them
    dtype = compute_dtype(x)
    a = torch.cat([p.a for p in parts]) if len(parts) > 1 else parts[0].a
    low = F.linear(parts[0].dropout(x).to(dtype), a.to(dtype))  # [..., sum of ranks]
    outs = []
    for p, low_p in zip(parts, low.split([p.a.shape[0] for p in parts], dim=-1), strict=True):
        base = p.base(x)
        base_2d = base.reshape(-1, base.shape[-1]).to(dtype)
        low_2d, b_t = low_p.reshape(-1, low_p.shape[-1]), p.b.to(dtype).t()
        if torch.compiler.is_compiling():
            # traced: the update is its own small matmul and the add is left to the compiler, which
            # fuses it into whatever reads the output next (rotary, SwiGLU, residual); addmm would
            # first copy the base output into its result (on the H100, +2.4% tokens/s without it)
            flat = base_2d + (low_2d @ b_t) * p.scaling
        else:
            flat = torch.addmm(base_2d, low_2d, b_t, alpha=p.scaling)
        outs.append(flat.view(base.shape).to(base.dtype))
    return outs


def _parts(module: Any) -> _Parts | None:
    """peft's LoRA pieces of ``module`` when it is a vanilla, active, unmerged single adapter."""
    if not hasattr(module, "lora_A"):  # a plain (or quantized) layer: its own forward is all there is
        return None
    try:
        active = [a for a in module.active_adapters if a in module.lora_A]
        if module.disable_adapters or module.merged or len(active) != 1:
            return None
        name = active[0]
        if name in getattr(module, "lora_variant", {}) or module.lora_B[name].bias is not None:
            return None
        return _Parts(
            module.base_layer,
            module.lora_A[name].weight,
            module.lora_B[name].weight,
            float(module.scaling[name]),
            module.lora_dropout[name],
        )
    except (AttributeError, KeyError, TypeError):  # another peft layout: use its forward
        return None
