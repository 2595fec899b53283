"""Packing: rows fill up, samples stay apart, and the loss equals the unpacked loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from danlu.data.dataset import collate
from danlu.data.packing import pack
from danlu.data.render import IGNORE, Sample, render
from danlu.train import forward, token_loss_sum

CONVERSATIONS = [
    [
        {"role": "user", "content": f"Question {i}: " + "why " * (i % 7)},
        {"role": "assistant", "content": f"Answer {i} " + "because " * (3 + i % 5)},
    ]
    for i in range(12)
]


@pytest.fixture(scope="module")
def samples(tokenizer) -> list[Sample]:
    return [render(tokenizer, c, 512, {tokenizer.eos_token_id}) for c in CONVERSATIONS]


def test_pack_fits_rows_and_keeps_every_sample_once(samples):
    rows = pack(samples, 128)
    assert len(rows) < len(samples)
    assert all(len(r.input_ids) <= 128 for r in rows)
    assert sum(len(r.input_ids) for r in rows) == sum(len(s.input_ids) for s in samples)
    # every sample appears exactly once: rebuild them from position restarts
    pieces = []
    for r in rows:
        starts = list(np.flatnonzero(np.asarray(r.position_ids) == 0)) + [len(r.input_ids)]
        pieces += [
            tuple(np.asarray(r.input_ids[a:b]).tolist()) for a, b in zip(starts, starts[1:], strict=False)
        ]
    assert sorted(pieces) == sorted(tuple(np.asarray(s.input_ids).tolist()) for s in samples)


def test_first_token_of_each_packed_sample_is_not_trained(samples):
    for r in pack(samples, 128):
        starts = np.flatnonzero(np.asarray(r.position_ids) == 0)
        assert (np.asarray(r.labels)[starts] == IGNORE).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_model_dir, samples, tokenizer, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        padded = collate(samples, pad)
        unpacked = (
            token_loss_sum(forward(model, padded), padded["labels"])
            / (padded["labels"][:, 1:] != IGNORE).sum()
        )
        packed_batch = collate(pack(samples, 160), pad)
        assert "attention_mask" not in packed_batch and "position_ids" in packed_batch
        n = (packed_batch["labels"][:, 1:] != IGNORE).sum()
        packed = token_loss_sum(forward(model, packed_batch), packed_batch["labels"]) / n
    assert n == (padded["labels"][:, 1:] != IGNORE).sum()
    assert abs(float(packed) - float(unpacked)) < 1e-4


def test_without_restarting_positions_samples_would_leak(tiny_model_dir, samples, tokenizer):
    """The equality above is not an accident: plain causal attention over the same row differs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = collate(pack(samples, 160), tokenizer.pad_token_id)
    with torch.no_grad():
        separate = token_loss_sum(forward(model, batch), batch["labels"])
        leaked = token_loss_sum(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert abs(float(separate) - float(leaked)) > 1e-3
