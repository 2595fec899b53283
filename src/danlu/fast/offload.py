"""Checkpointed layers' inputs kept in CPU memory between the forward and the backward.

With every decoder layer checkpointed, what stays on the GPU from the forward to the backward is
each layer's input: for an 8B model at 4,096 tokens, 32 MB a layer, 1 GiB in all, on top of the
weights. :class:`Offloader` moves each of these to pinned CPU memory as the layer's forward ends
and brings it back as the backward reaches the layer. Both copies run on a stream of their own,
so they overlap the layers' compute: the copy out starts when the layer has run, and when the
backward asks for layer i's input, the copy of layer i-1's input back to the GPU starts, while
layer i's backward runs.

It works through autograd's saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``),
entered around one layer at a time and only for the tensor that is that layer's input: whatever
else the layer saves (weights, rotary tables, offsets) stays where it is. The layer must save its
input through autograd (a compiled layer does; in eager mode, the reentrant checkpoint does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch


@dataclass
class _Stored:
    index: int
    host: torch.Tensor  # the CPU copy
    device: torch.device
    gpu: torch.Tensor | None = None  # the copy back, once started
    ready: Any = None  # CUDA event: the copy back has landed
    uses: int = 1  # saved references to it whose backward has not asked for it yet


class Offloader:
    """Saved-tensor hooks for one forward pass; make a new one for every forward."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = _side_stream(device) if self.cuda else None
        self.stored: list[_Stored] = []
        self.moved_bytes = 0

    @contextmanager
    def saving(self, x: torch.Tensor) -> Iterator[None]:
        """Within the block, a saved tensor that is ``x`` (same memory and shape) goes to the CPU."""
        key = (x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride())
        moved: list[_Stored] = []

        def pack(t: torch.Tensor) -> Any:
            if (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride()) != key:
                return t
            if moved:  # saved twice by the layer: one copy serves both
                moved[0].uses += 1
            else:
                moved.append(self._out(t))
            return moved[0]

        with torch.autograd.graph.saved_tensors_hooks(pack, self._back):
            yield

    def _out(self, t: torch.Tensor) -> _Stored:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        else:
            host.copy_(t)
        self.moved_bytes += t.numel() * t.element_size()
        stored = _Stored(len(self.stored), host, t.device)
        self.stored.append(stored)
        return stored

    def _back(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Stored):
            return packed
        self._fetch(packed)
        if packed.index > 0:  # the backward runs the layers in reverse: start the previous one's copy
            self._fetch(self.stored[packed.index - 1])
        gpu = packed.gpu
        packed.uses -= 1
        if packed.uses <= 0:
            packed.gpu = None  # autograd holds it now: do not keep it past the layer's backward
        if self.cuda:
            current = torch.cuda.current_stream(gpu.device)
            current.wait_event(packed.ready)
            gpu.record_stream(current)
        return gpu

    def _fetch(self, stored: _Stored) -> None:
        if stored.gpu is not None:
            return
        if not self.cuda:
            stored.gpu = stored.host.clone()
            return
        with torch.cuda.stream(self.stream):
            stored.gpu = stored.host.to(stored.device, non_blocking=True)
            stored.ready = self.stream.record_event()


@cache
def _side_stream(device: torch.device) -> Any:
    return torch.cuda.Stream(device)
