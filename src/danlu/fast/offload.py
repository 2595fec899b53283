"""Activations kept for the backward in CPU memory, copied out and back while other layers compute.

With every decoder layer checkpointed, what stays on the GPU from the forward to the backward is
each checkpointed part's input: for an 8B model at 4,096 tokens, 32 MB a part. A part that keeps
some of its results so that the backward need not compute them again (the attention half, see
:func:`danlu.fast.decoder._checkpointed_attention`) keeps more: 80 MB more at that size.
:class:`Offloader` moves what a part keeps to pinned CPU memory as the part's forward ends and
brings it back ahead of the backward's need, both copies on a stream of their own, so that they
overlap the layers' compute.

It works through autograd's saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``),
entered around one part at a time. Each part's tensors are one group; the backward runs the parts
in reverse, so when it asks for a group, the copies back of the groups below it start too, as
many as :data:`AHEAD` bytes' worth. Parameters (and views of them), the tensors it is told to
leave (the rotary tables) and anything small stay where they are. The part must save through
autograd (a compiled part does; in eager mode, the reentrant checkpoint does).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

AHEAD = 64 * 2**20
"""Bytes of the groups below the one the backward is at whose copies back are started early."""

SMALLEST = 2**20
"""A saved tensor of fewer bytes stays on the GPU (norms' and attention's statistics, LoRA's r columns)."""


@dataclass
class _Stored:
    index: int  # the group's
    host: torch.Tensor  # the CPU copy
    device: torch.device
    gpu: torch.Tensor | None = None  # the copy back, once started
    ready: Any = None  # CUDA event: the copy back has landed
    uses: int = 1  # saved references to it whose backward has not asked for it yet


@dataclass
class _Group:
    stored: list[_Stored] = field(default_factory=list)
    nbytes: int = 0


class Offloader:
    """Saved-tensor hooks for one forward pass; make a new one for every forward.

    Parameters and views of them are never moved (a compiled part saves a weight as the parameter
    itself; told apart by type because listing an 8B LoRA model's 739 parameters every forward
    took about 5 ms with the GPU idle), nor ``stay``: other tensors that every part shares, such
    as the rotary tables, and any view of them."""

    def __init__(self, device: torch.device, stay: Iterable[torch.Tensor] = ()) -> None:
        self.cuda = device.type == "cuda"
        self.stream = _side_stream(device) if self.cuda else None
        self.stay = {t.untyped_storage().data_ptr() for t in stay}
        self.groups: list[_Group] = []
        self.moved_bytes = 0

    @property
    def stored(self) -> list[_Stored]:
        return [s for g in self.groups for s in g.stored]

    @contextmanager
    def saving(self, x: torch.Tensor | None = None) -> Iterator[None]:
        """Within the block (one part's forward), a saved tensor that is ``x`` (same memory and
        shape) goes to the CPU; without ``x``, every saved activation of at least :data:`SMALLEST` bytes."""
        index, group = len(self.groups), _Group()
        self.groups.append(group)
        wanted = None if x is None else _key(x)
        seen: dict[tuple, _Stored] = {}

        def pack(t: torch.Tensor) -> Any:
            key = _key(t)
            moves = key == wanted if wanted is not None else self._movable(t)
            if not moves:
                return t
            if key in seen:  # saved twice by the part: one copy serves both
                seen[key].uses += 1
                return seen[key]
            seen[key] = self._out(t, index, group)
            return seen[key]

        with torch.autograd.graph.saved_tensors_hooks(pack, self._back):
            yield

    def _movable(self, t: torch.Tensor) -> bool:
        return (
            t.numel() * t.element_size() >= SMALLEST
            and _dense(t)  # comes back with the same strides
            and not isinstance(t, torch.nn.Parameter)
            and not isinstance(t._base, torch.nn.Parameter)
            and t.untyped_storage().data_ptr() not in self.stay
        )

    def _out(self, t: torch.Tensor, index: int, group: _Group) -> _Stored:
        host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=self.cuda)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        else:
            host.copy_(t)
        nbytes = t.numel() * t.element_size()
        self.moved_bytes += nbytes
        group.nbytes += nbytes
        stored = _Stored(index, host, t.device)
        group.stored.append(stored)
        return stored

    def _back(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Stored):
            return packed
        self._fetch(packed)
        # the backward runs the parts in reverse: start the copies of the ones below (at least one)
        ahead, below = 0, packed.index - 1
        while below >= 0 and (ahead == 0 or ahead < AHEAD):
            group = self.groups[below]
            for s in group.stored:
                self._fetch(s)
            ahead += max(group.nbytes, 1)
            below -= 1
        gpu = packed.gpu
        packed.uses -= 1
        if packed.uses <= 0:
            packed.gpu = None  # autograd holds it now: do not keep it past the part's backward
        if self.cuda:
            current = torch.cuda.current_stream(gpu.device)
            current.wait_event(packed.ready)
            gpu.record_stream(current)
        return gpu

    def _fetch(self, stored: _Stored) -> None:
        if stored.gpu is not None or stored.uses <= 0:  # under way, or used and let go
            return
        if not self.cuda:
            stored.gpu = stored.host.clone()
            return
        with torch.cuda.stream(self.stream):
            stored.gpu = stored.host.to(stored.device, non_blocking=True)
            stored.ready = self.stream.record_event()


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory exactly, in some order of its dimensions."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).is_contiguous()


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())


@cache
def _side_stream(device: torch.device) -> Any:
    return torch.cuda.Stream(device)
