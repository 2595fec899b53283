"""Padding-free batches and the attention that keeps their sequences apart.

A batch (padded rows with an attention mask, or packed rows with restarting position ids, as
:func:`danlu.data.dataset.collate` makes them) becomes one row of only its real tokens; the
sequences in it are told apart by ``cu_seqlens``, their start offsets (int32, ``n + 1`` values).
No compute is spent on padding, and attention runs on each sequence alone: on CUDA through
torch's variable-length flash attention (``torch.nn.attention.varlen``), or, when every sequence
has the same length, as an ordinary batch through cuDNN's faster fused attention; elsewhere through
``scaled_dot_product_attention`` one sequence at a time (the same numbers, for tests on the CPU).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from danlu.data.render import IGNORE
from danlu.fast.kernels import compute_dtype

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # torch < 2.10
    _varlen_attn = None


@dataclass
class Flat:
    """One padding-free row: ``T`` tokens of ``n`` sequences."""

    input_ids: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [T], restarting at 0 for each sequence
    targets: torch.Tensor  # [T], the next token of the same sequence, IGNORE where none is trained
    cu_seqlens: torch.Tensor  # [n + 1] int32: sequence i is tokens cu_seqlens[i] : cu_seqlens[i + 1]
    max_len: int
    # where sequences share a prefix (:mod:`danlu.fast.pairs`): the keys of sequence i are the tokens
    # keys[cu_keys[i] : cu_keys[i + 1]] (a prefix held by another sequence, then its own tokens), and
    # its queries are the last ones of those keys; None: each sequence's keys are its own tokens
    keys: torch.Tensor | None = None  # [K] indices into the T tokens
    cu_keys: torch.Tensor | None = None  # [n + 1] int32
    max_keys: int = 0
    # where each of the T tokens' own query sits among the K keys (the last ones of its sequence's):
    # with sequences of equal key length, attention runs over the K keys as a dense batch
    queries: torch.Tensor | None = None  # [T] indices into the K keys
    # the inverses of ``keys`` and ``queries`` (:func:`inverse`), for their gathers' backward
    keys_inverse: torch.Tensor | None = None  # [T, copies]
    queries_inverse: torch.Tensor | None = None  # [K, 1]


def flatten(batch: dict[str, torch.Tensor]) -> Flat:
    """The real tokens of a padded or packed batch in one row, with next-token targets."""
    ids, labels = batch["input_ids"], batch["labels"]
    # the target at each position is the next token of the same row; a row's last position has none
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)
    if "position_ids" in batch:  # packed rows (the first token of every sample carries no label)
        positions, ids, targets = batch["position_ids"].reshape(-1), ids.reshape(-1), targets.reshape(-1)
    else:
        real = batch["attention_mask"].bool()
        positions = (real.long().cumsum(-1) - 1)[real]
        ids, targets = ids[real], targets[real]
    starts = torch.nonzero(positions == 0).flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([positions.numel()])])
    cu = torch.cat([starts, ends[-1:]]).to(torch.int32)
    # a sequence's last token must not learn the next sequence's first: targets there are dropped
    targets = targets.clone()
    targets[ends - 1] = IGNORE
    return Flat(ids, positions, targets, cu, int((ends - starts).max()))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    flat: Flat,
    scale: float,
    dense: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention within each sequence: ``q`` [T, heads, d], ``k``/``v`` [T, kv heads, d].
    ``dense``: sequences of equal length go through cuDNN as an ordinary batch. ``window``: each
    query sees only the last ``window`` tokens (itself included), as transformers' sliding-window
    mask has it (``kv > q - window``); no sequence longer than the window, no effect."""
    # under autocast the projections come out in the autocast dtype, but rotary angles kept in fp32
    # (fp32 weights: full fine-tuning) promote q and k back; flash attention takes fp16/bf16 only
    dtype = compute_dtype(q)
    shared = flat.keys is not None
    longest = flat.max_keys if shared else flat.max_len
    window = window if window is not None and longest > window else None
    flash = q.is_cuda and dtype in (torch.float16, torch.bfloat16)
    if shared:  # each sequence's keys: a prefix gathered from the sequence that holds it, then its own
        k, v = gather(k, flat.keys, flat.keys_inverse), gather(v, flat.keys, flat.keys_inverse)
    cu_keys = flat.cu_keys if shared else flat.cu_seqlens
    if window is None and dense and flash and not shared and uniform(flat, q.shape[0]):
        return _dense(q.to(dtype), k.to(dtype), v.to(dtype), flat.cu_seqlens.numel() - 1, scale)
    if window is None and dense and flash and shared and uniform_keys(flat):
        return dense_shared(q.to(dtype), k.to(dtype), v.to(dtype), flat, scale)
    if flash and _varlen_attn is not None and (window is None or "window_size" in _CAUSAL):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return _varlen_attn(
            q,
            k,
            v,
            flat.cu_seqlens,
            cu_keys,
            flat.max_len,
            longest,
            **_causal(q, k, window),  # queries are the last keys: causal aligned at the bottom right
            scale=scale,
        )
    gqa = q.shape[1] != k.shape[1]
    bounds, key_bounds = flat.cu_seqlens.tolist(), cu_keys.tolist()
    parts = []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        q_ = q[start:end].transpose(0, 1).unsqueeze(0)
        k_, v_ = (t[key_bounds[i] : key_bounds[i + 1]].transpose(0, 1).unsqueeze(0) for t in (k, v))
        n_q, n_k = end - start, key_bounds[i + 1] - key_bounds[i]
        mask = None
        if n_k != n_q or (window is not None and n_k > window):
            mask = _band(n_q, n_k, window, q.device)
        out = F.scaled_dot_product_attention(
            q_, k_, v_, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
        )
        parts.append(out[0].transpose(0, 1))
    return torch.cat(parts)


def _band(queries: int, keys: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[queries, keys] True where query i (the key ``i + keys - queries``) may see key j: j at or
    before it and, with a window, less than ``window`` keys back."""
    i = torch.arange(queries, device=device) + (keys - queries)
    gap = i[:, None] - torch.arange(keys, device=device)[None, :]
    return (gap >= 0) & (gap < window) if window is not None else gap >= 0


def uniform(flat: Flat, tokens: int) -> bool:
    """Whether every sequence of ``flat`` has the same length (full rows of a padded batch, or
    rows packed to a fixed length), known without waiting for the GPU."""
    return (flat.cu_seqlens.numel() - 1) * flat.max_len == tokens


def uniform_keys(flat: Flat) -> bool:
    """Whether every sequence of a shared-prefix ``flat`` has the same number of keys (whole pairs of
    equal length), known without waiting for the GPU."""
    return flat.queries is not None and (flat.cu_keys.numel() - 1) * flat.max_keys == flat.keys.numel()


def dense_shared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flat: Flat, scale: float) -> torch.Tensor:
    """Shared-prefix attention (``k``/``v`` already gathered into each sequence's keys) as a dense
    causal batch, for sequences of equal key length: the queries are gathered the same way, so each
    sequence is a whole row again, and only the outputs of each token's own query are kept. The
    prefix's queries are computed twice (a quarter more attention at prompts as long as replies),
    but through cuDNN's kernel rather than the variable-length one (see :func:`_dense`); the
    projections and MLPs still run the prefix once. The prefix's second queries get no gradient."""
    out = _dense(gather(q, flat.keys, flat.keys_inverse), k, v, flat.cu_keys.numel() - 1, scale)
    return gather(out, flat.queries, flat.queries_inverse)


def inverse(index: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, copies]: for each row of a tensor, the positions in ``index`` that copy it (as many
    columns as the most-copied row has copies), ``len(index)`` where a row has fewer."""
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=rows)
    first = torch.cumsum(counts, 0) - counts  # where each row's copies start in ``order``
    rank = torch.arange(index.numel(), device=index.device) - first[index[order]]
    out = torch.full((rows, int(counts.max()) if rows else 0), index.numel(), device=index.device)
    out[index[order], rank] = order
    return out


def gather(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor | None) -> torch.Tensor:
    """``x.index_select(0, index)`` whose backward gathers too, given ``inverse`` (:func:`inverse`):
    each row's gradient is the sum of its copies' (index_select's own backward is an atomic
    index_add: 23 ms of an 8B DPO step on the H200, for the keys, values and queries)."""
    if inverse is None:
        return x.index_select(0, index)
    return _Gather.apply(x, index, inverse)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])  # a zero row for "no copy"
        out = padded.index_select(0, inverse[:, 0])
        for j in range(1, inverse.shape[1]):
            out = out + padded.index_select(0, inverse[:, j])
        return out, None, None


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """Causal attention over ``n`` sequences of equal length laid out as a [n, heads, L, d] batch,
    where cuDNN's fused attention runs (grouped-query heads included): on the H100 at 2 x 2048
    tokens, 32 heads of 128, its forward and backward took 0.71 ms against 1.27 ms for the
    variable-length flash kernel (forward alone 0.15 against 0.44). Flash attention stands in
    where cuDNN's does not apply."""
    tokens, heads, d = q.shape
    q_, k_, v_ = (t.view(n, tokens // n, t.shape[1], d).transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(_DENSE_BACKENDS, set_priority=True):
        out = F.scaled_dot_product_attention(
            q_, k_, v_, is_causal=True, scale=scale, enable_gqa=k.shape[1] != heads
        )
    return out.transpose(1, 2).reshape(tokens, heads, d)


_DENSE_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _causal_keywords() -> dict[str, Any]:
    """varlen_attn's keywords for causal attention: its signature changed between torch 2.10 and 2.11."""
    if _varlen_attn is None:
        return {}
    params = inspect.signature(_varlen_attn).parameters
    return {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}


_CAUSAL = _causal_keywords()  # read once here, not in every layer's call (nor inside a compiled graph)
_HAS_GQA_FLAG = _varlen_attn is not None and "enable_gqa" in inspect.signature(_varlen_attn).parameters


def _causal(q: torch.Tensor, k: torch.Tensor, window: int | None = None) -> dict[str, Any]:
    """varlen_attn's keywords: causal, over the last ``window`` keys where one is given (flash
    attention's left bound counts the keys before the query: ``window - 1``)."""
    gqa = _HAS_GQA_FLAG and q.shape[1] != k.shape[1]
    keywords = {"window_size": (window - 1, 0)} if window is not None else _CAUSAL
    return {**keywords, "enable_gqa": True} if gqa else keywords
