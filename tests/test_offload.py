"""Tests for danlu.fast.offload: what the saved-tensor hooks move, how it comes back, and how far
ahead of the backward the copies back start (on the CPU, where the copies are CPU to CPU)."""

from __future__ import annotations

import pytest
import torch

from danlu.fast import offload
from danlu.fast.offload import Offloader


def chain(o: Offloader | None, w: torch.nn.Parameter, scale: torch.Tensor, groups: int = 4, table=None):
    """``groups`` parts, each a matmul of two transposed views (saved as such: one of an activation,
    one of the weight ``w``), a scaling and, given a ``table``, a product with it."""
    torch.manual_seed(0)
    x = torch.randn(64, 64, requires_grad=True)
    h = x
    for _ in range(groups):
        with o.saving() if o else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            h = (h.t() @ w.t()).t() * scale
            h = h * table if table is not None else h
    return x, h


@pytest.fixture
def small_enough(monkeypatch):
    monkeypatch.setattr(offload, "SMALLEST", 1024)  # a 64 x 64 fp32 activation (16 KB) moves


def test_activations_move_weights_and_small_tensors_stay_and_gradients_match(small_enough):
    w = torch.nn.Parameter(torch.randn(64, 64) / 8)
    scale = torch.tensor([0.9], requires_grad=True)  # 4 bytes: stays
    table = torch.rand(64, 64) + 0.5  # shared by every part, like the rotary tables: told to stay
    x, h = chain(None, w, scale, table=table)
    h.sum().backward()
    want = (x.grad, w.grad.clone(), scale.grad.clone())
    w.grad = scale.grad = None

    o = Offloader(torch.device("cpu"), [table])
    x, h = chain(o, w, scale, table=table)
    moved = o.stored
    # per part: the matmul's transposed input and the product the scaling saved; never the
    # parameter's transposed view, scale or the table
    assert len(o.groups) == 4 and all(len(g.stored) == 2 for g in o.groups)
    assert o.moved_bytes == 8 * 64 * 64 * 4
    assert any(s.host.stride() == (1, 64) for s in moved)  # a transposed view comes back transposed
    h.sum().backward()
    for got, expected in zip((x.grad, w.grad, scale.grad), want, strict=True):
        torch.testing.assert_close(got, expected)
    assert all(s.uses == 0 and s.gpu is None for s in moved)  # each came back once, none kept


def test_a_part_saving_one_tensor_twice_moves_it_once(small_enough):
    o = Offloader(torch.device("cpu"))
    x = torch.randn(64, 64, requires_grad=True)
    with o.saving():
        y = x * x  # saves x twice
    assert len(o.stored) == 1 and o.stored[0].uses == 2
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * x)
    assert o.stored[0].uses == 0


def test_non_dense_views_and_only_the_named_tensor_stay_or_move(small_enough):
    o = Offloader(torch.device("cpu"))
    base = torch.randn(64, 128, requires_grad=True)
    with o.saving():
        (base[:, :64] * 2).sum()  # multiplying by a number saves nothing
        base[:, :64].exp()  # exp saves its output: contiguous, moves
        y = base[:, ::2] * base[:, 1::2]  # strided halves of one tensor: not dense, stay
    assert [tuple(s.host.shape) for s in o.stored] == [(64, 64)]
    a, b = torch.randn(64, 64, requires_grad=True), torch.randn(64, 64, requires_grad=True)
    with o.saving(a):
        z = a * b  # only a moves
    assert len(o.groups[-1].stored) == 1 and o.groups[-1].stored[0].host.data_ptr() != a.data_ptr()
    (y.sum() + z.sum()).backward()
    torch.testing.assert_close(a.grad, b)


@pytest.mark.parametrize(
    ("ahead", "started"), [(1, [3, 2]), (2 * 16 * 1024, [3, 2, 1]), (2**30, [3, 2, 1, 0])]
)
def test_the_backward_starts_copies_back_for_parts_below_up_to_ahead_bytes(
    small_enough, monkeypatch, ahead, started
):
    """Asked for the last part's tensors, the copies back of the parts below start too: at least
    one part, then as many as fit in ``AHEAD`` bytes (each part here moves its 16 KB activation)."""
    monkeypatch.setattr(offload, "AHEAD", ahead)
    w = torch.nn.Parameter(torch.randn(64, 64) / 8)
    seen = []
    real_back = Offloader._back

    def back(self, packed):
        if not seen and isinstance(packed, offload._Stored):  # the first moved tensor asked for:
            out = real_back(self, packed)  # which parts' copies back are under way (or done)
            seen.append(
                sorted({s.index for s in self.stored if s.gpu is not None or s.uses == 0}, reverse=True)
            )
            return out
        return real_back(self, packed)

    monkeypatch.setattr(Offloader, "_back", back)  # before the hooks take it
    o = Offloader(torch.device("cpu"))
    _, h = chain(o, w, torch.tensor([0.9]))
    h.sum().backward()
    assert seen[0] == started
