"""RMSNorm, rotary embedding and SwiGLU / GeGLU: the memory-bound steps between a decoder's matmuls.

Written in plain torch with exactly the arithmetic of transformers' Llama and Gemma-3 modules
(RMSNorm in fp32, rotary in the activation dtype), so the two paths give the same numbers. On CUDA each is
compiled by torch.compile (Inductor writes one Triton kernel for the forward and one for the
backward of each, instead of the 4-8 separate reads and writes of the eager ops); with dynamic
shapes, so batches of any token count reuse the same kernels. On the CPU they run eagerly.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from danlu.fast import C_COMPILERS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: the scale is ``1 + weight``, applied in fp32 before the cast back (Llama
    casts first and multiplies by ``weight`` in the activation dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q``/``k`` [T, heads, d] by the angles of their positions (``cos``/``sin`` [T, d])."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Gemma's MLP activation (``gelu_pytorch_tanh``): GELU's tanh approximation of the gate, times up."""
    return F.gelu(gate, approximate="tanh") * up


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x``'s device produce: autocast's where it is on, else ``x``'s own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def pick(fn: Callable, fused: bool, device: torch.device) -> Callable:
    """``fn`` itself, or its compiled form where fusing is asked for and runs (CUDA with Triton)."""
    return _compiled(fn) if fused and can_compile(device) else fn


@cache
def _toolchain() -> bool:
    # Inductor writes Triton kernels, and Triton builds its launcher with the system C compiler
    return importlib.util.find_spec("triton") is not None and any(shutil.which(c) for c in C_COMPILERS)


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile can make GPU kernels here: CUDA, Triton and a C compiler."""
    return device.type == "cuda" and _toolchain()


@cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)
