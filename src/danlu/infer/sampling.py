"""Per-request sampling settings and the next token for every row of a batch.

Each row of a decoding batch may carry its own settings: temperature, top-p, top-k, penalties,
logit bias, seed and log-probabilities. :func:`choose` applies them to one step's logits, in
the order transformers' ``generate`` does (penalties and bias, then temperature, top-k, top-p),
and returns one token per row. Log-probabilities are those of the model itself (its raw
distribution, before penalties, bias and temperature), as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from danlu.errors import UserError


@dataclass
class GenerationSettings:
    """Sampling settings; ``temperature=0`` means greedy decoding.

    ``presence_penalty`` / ``frequency_penalty`` are OpenAI's: subtracted from the logit of every
    token already generated, once (presence) and per occurrence (frequency).
    ``repetition_penalty`` is transformers' (divides positive logits of tokens in the prompt and
    reply; 1.0 = off). ``logit_bias`` adds to token ids' logits. ``stop``: strings that end the
    reply (not included in it). ``logprobs``: None for none, else the chosen token's
    log-probability plus this many most likely alternatives (0-20).
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = field(default=None)
    logprobs: int | None = None

    def checked(self, vocab_size: int) -> GenerationSettings:
        """These settings with numbers coerced (a slider's int 2 → 2.0), or a one-line UserError."""
        out = GenerationSettings(
            max_new_tokens=int(self.max_new_tokens),
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=int(self.top_k),
            repetition_penalty=float(self.repetition_penalty),
            seed=None if self.seed is None else int(self.seed),
            stop=tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()} or None,
            logprobs=None if self.logprobs is None else int(self.logprobs),
        )
        problems = [
            (out.max_new_tokens < 1, "max_new_tokens must be at least 1"),
            (not 0 <= out.temperature <= 100, "temperature must be between 0 and 100"),
            (not 0 < out.top_p <= 1, "top_p must be above 0 and at most 1"),
            (out.top_k < 0, "top_k must be 0 (off) or more"),
            (not 0 < out.repetition_penalty <= 100, "repetition_penalty must be above 0"),
            (out.seed is not None and not -(2**63) <= out.seed < 2**64, "seed must fit in 64 bits"),
            (out.logprobs is not None and not 0 <= out.logprobs <= 20, "logprobs must be 0 to 20"),
        ]
        for bad, message in problems:
            if bad:
                raise UserError(message)
        for token in out.logit_bias or {}:
            if not 0 <= token < vocab_size:
                raise UserError(
                    f"logit_bias: token id {token} is not in the vocabulary (0 to {vocab_size - 1})"
                )
        return out


@dataclass
class TokenLogprob:
    """One generated token: its text, id, log-probability, and the most likely alternatives."""

    token: str
    id: int
    logprob: float
    top: list[tuple[str, int, float]] = field(default_factory=list)


@dataclass
class Row:
    """What :func:`choose` needs of one row: its settings, tokens so far, and random generator."""

    settings: GenerationSettings
    prompt: list[int]
    generated: list[int]
    generator: torch.Generator | None = None


def generator_for(seed: int | None, device: Any) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed % 2**64)
    return g


def _penalize(logits: torch.Tensor, rows: list[Row]) -> None:
    """Repetition, presence and frequency penalties and logit bias, in place, row by row."""
    for i, row in enumerate(rows):
        s = row.settings
        if s.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt) | set(row.generated)), device=logits.device)
            if len(seen):
                score = logits[i, seen]
                logits[i, seen] = torch.where(
                    score < 0, score * s.repetition_penalty, score / s.repetition_penalty
                )
        if (s.presence_penalty or s.frequency_penalty) and row.generated:
            ids, counts = torch.tensor(row.generated, device=logits.device).unique(return_counts=True)
            logits[i, ids] -= counts.to(logits.dtype) * s.frequency_penalty + s.presence_penalty
        if s.logit_bias:
            ids = torch.tensor(list(s.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(s.logit_bias.values()), device=logits.device)


def _sample(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Temperature, top-k and top-p per row, then one draw per row (its own generator if seeded)."""
    vocab = logits.shape[-1]
    temps = torch.tensor([r.settings.temperature for r in rows], device=logits.device)
    scaled = logits / temps.unsqueeze(-1)
    ks = [min(r.settings.top_k, vocab) if r.settings.top_k > 0 else vocab for r in rows]
    widest = max(ks)
    if widest < vocab:
        values, index = scaled.topk(widest, dim=-1)
    else:
        values, index = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(values.shape[-1], device=logits.device)
    values = values.masked_fill(rank >= torch.tensor(ks, device=logits.device).unsqueeze(-1), float("-inf"))
    probs = values.softmax(dim=-1)
    top_p = torch.tensor([r.settings.top_p for r in rows], device=logits.device).unsqueeze(-1)
    outside = probs.cumsum(dim=-1) - probs >= top_p  # tokens after the nucleus (the first always stays)
    probs = probs.masked_fill(outside, 0.0)
    picks = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        picks[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(-1)
    for i, r in enumerate(rows):
        if r.generator is not None:
            picks[i] = torch.multinomial(probs[i], 1, generator=r.generator)[0]
    return index.gather(-1, picks.unsqueeze(-1)).squeeze(-1)


def choose(
    logits: torch.Tensor, rows: list[Row], text_of: Any
) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token of every row from one step's ``logits`` [rows, vocab], and its logprob entry
    when the row asked for one. ``text_of(row_index, token_id)`` names a token for those entries."""
    logits = logits.float()
    wanted = [i for i, r in enumerate(rows) if r.settings.logprobs is not None]
    raw = logits[wanted].log_softmax(dim=-1) if wanted else None
    if any(
        r.settings.repetition_penalty != 1.0
        or r.settings.presence_penalty
        or r.settings.frequency_penalty
        or r.settings.logit_bias
        for r in rows
    ):
        logits = logits.clone()
        _penalize(logits, rows)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if r.settings.temperature > 0]
    if sampled:
        tokens[sampled] = _sample(logits[sampled], [rows[i] for i in sampled])
    chosen = tokens.tolist()
    entries: list[TokenLogprob | None] = [None] * len(rows)
    for j, i in enumerate(wanted):
        assert raw is not None
        token = chosen[i]
        entry = TokenLogprob(text_of(i, token), token, float(raw[j, token]))
        k = rows[i].settings.logprobs or 0
        if k:
            values, ids = raw[j].topk(k)
            entry.top = [
                (text_of(i, t), t, float(v)) for t, v in zip(ids.tolist(), values.tolist(), strict=True)
            ]
        entries[i] = entry
    return chosen, entries
