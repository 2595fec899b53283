"""Preference pairs with their prompt run once: chosen and rejected share it, so they share its
hidden states too (a causal model's prompt positions never see the reply).

A batch of ``n`` pairs, padded as ``[chosen..., rejected...]`` rows with each pair's prompt length,
becomes one padding-free row holding every chosen row whole and only the reply of each rejected
row. The rejected reply's tokens keep their positions (they start after the prompt) and attend to
the prompt's keys, gathered from the chosen row that holds them, then to their own
(:attr:`danlu.fast.varlen.Flat.keys`). The rejected reply's first token is scored on the prompt's
last hidden state, the same one the chosen reply's first token is scored on. With prompts as long
as replies a pair costs three quarters of the two full rows, in the policy's forward and backward
and in the reference's forward alike; the log-probs are those of the two full rows (to float
rounding: the shared prompt is computed in one pass, and attention splits its keys differently).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from danlu.data.render import IGNORE
from danlu.fast import varlen
from danlu.fast.varlen import Flat

PROMPT_LENGTHS = "prompt_lengths"
"""The batch key (``[n]``, one per pair) that asks :func:`danlu.fast.loss.sequence_logps` to share
each pair's prompt; the plain path ignores it (its rows are whole)."""


@dataclass
class Scored:
    """Where a padded row's labelled tokens are scored in the shared row: hidden state
    ``index[j]`` predicts ``targets[j]``, a token of padded row ``rows[j]``."""

    index: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor


_last: tuple[weakref.ref, weakref.ref, Flat, Scored] | None = None
"""The last batch flattened (its input ids and prompt lengths, held weakly) and the result: a DPO
step's reference forward runs on the policy's batch, and finds it here (the flattening reads
lengths back from the GPU, which would wait for the policy's forward to finish)."""


def flatten(batch: dict[str, torch.Tensor]) -> tuple[Flat, Scored]:
    """The shared padding-free row of a padded pair batch, and where each row's tokens are scored."""
    global _last
    ids, prompt_lengths = batch["input_ids"], batch[PROMPT_LENGTHS]
    if _last is not None and _last[0]() is ids and _last[1]() is prompt_lengths:
        return _last[2], _last[3]
    flat, scored = _flatten(batch)
    _last = weakref.ref(ids), weakref.ref(prompt_lengths), flat, scored
    return flat, scored


def _flatten(batch: dict[str, torch.Tensor]) -> tuple[Flat, Scored]:
    ids, labels, real = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    device = ids.device
    n = ids.shape[0] // 2
    lengths = real.sum(1).tolist()
    prompts = batch[PROMPT_LENGTHS].tolist()
    pieces, positions, seq_lengths, key_lengths = [], [], [], []
    keys: list[torch.Tensor] = []
    queries: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    rows: list[int] = []
    at = 0
    for i in range(n):
        shared, chosen, rejected = prompts[i], lengths[i], lengths[n + i]
        if not 0 <= shared <= min(chosen, rejected):
            raise ValueError(f"pair {i}: prompt length {shared} outside its rows ({chosen}, {rejected})")
        own = torch.arange(at, at + chosen, device=device)
        tail = torch.arange(at + chosen, at + chosen + rejected - shared, device=device)
        pieces += [ids[i, :chosen], ids[n + i, shared:rejected]]
        positions += [torch.arange(chosen, device=device), torch.arange(shared, rejected, device=device)]
        keys += [own, own[:shared], tail]
        # each token's own query is the last of its sequence's keys: the chosen row's all, the
        # rejected row's after the prompt
        start = sum(key_lengths)
        queries += [
            torch.arange(start, start + chosen),
            torch.arange(start + chosen + shared, start + chosen + rejected),
        ]
        seq_lengths += [chosen, rejected - shared]
        key_lengths += [chosen, rejected]
        # a row's hidden state at position t predicts its label at t + 1
        for row, hidden in ((i, own), (n + i, torch.cat([own[:shared], tail]))):
            wanted = labels[row, 1 : len(hidden)]
            keep = wanted != IGNORE
            index.append(hidden[:-1][keep])
            targets.append(wanted[keep])
            rows.append(row)
        at += chosen + rejected - shared
    counts = [int(t.numel()) for t in targets]
    cu = torch.tensor([0, *seq_lengths], device=device).cumsum(0).to(torch.int32)
    cu_keys = torch.tensor([0, *key_lengths], device=device).cumsum(0).to(torch.int32)
    flat = Flat(
        input_ids=torch.cat(pieces),
        position_ids=torch.cat(positions),
        targets=torch.full((at,), IGNORE, dtype=labels.dtype, device=device),  # scored through Scored
        cu_seqlens=cu,
        max_len=max(seq_lengths),
        keys=torch.cat(keys),
        cu_keys=cu_keys,
        max_keys=max(key_lengths),
        queries=torch.cat(queries).to(device),
    )
    flat.keys_inverse = varlen.inverse(flat.keys, at)
    flat.queries_inverse = varlen.inverse(flat.queries, flat.keys.numel())
    scored = Scored(
        torch.cat(index),
        torch.cat(targets),
        torch.repeat_interleave(torch.tensor(rows, device=device), torch.tensor(counts, device=device)),
    )
    return flat, scored


def prompt_lengths(prompts: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """The :data:`PROMPT_LENGTHS` entry of a batch of pairs whose prompts have these lengths."""
    return torch.tensor(prompts, dtype=torch.long, device=device)
