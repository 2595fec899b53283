"""A next-token loss that never holds the logits of the whole batch.

The plain path turns the last hidden states into batch × length × vocabulary logits (bf16), then
an fp32 copy for the loss, and autograd keeps both for the backward: on Llama-3-8B (vocabulary
128,256) at 2 × 2048 tokens that is about 7 GiB, more than the 4-bit weights. Here the decoder's
hidden states go to the loss instead, and only the positions that are trained (assistant tokens)
are projected onto the vocabulary, a chunk of :data:`CHUNK` tokens at a time. Each chunk is
recomputed in the backward (activation checkpointing), so at most one chunk's logits exist at
any moment. The result is the same summed cross-entropy as the plain path, to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from danlu.data.render import IGNORE
from danlu.fast import CHUNK


def supports(model: Any) -> bool:
    """Whether ``model`` (a causal LM, or peft around one) exposes its decoder and output layer."""
    lm = _causal_lm(model)
    return (
        hasattr(lm, "get_decoder")
        and lm.get_decoder() is not None
        and isinstance(lm.get_output_embeddings(), torch.nn.Linear)
        and getattr(lm.get_output_embeddings(), "bias", None) is None
        and getattr(lm.config, "final_logit_softcapping", None) is None
        and getattr(lm.config, "logit_scale", None) is None
    )


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions of a padded or packed batch."""
    lm = _causal_lm(model)
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    if "position_ids" in batch:
        out = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    else:
        out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    return chunked_cross_entropy(hidden[keep], head.weight, labels[keep])


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sum(cross_entropy(hidden @ weight.T, targets))`` with one chunk of logits alive at a time."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), CHUNK):
        end = start + CHUNK
        total = total + checkpoint(
            _chunk,
            hidden[start:end],
            weight,
            targets[start:end],
            use_reentrant=False,
            preserve_rng_state=False,
        )
    return total


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def _causal_lm(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
