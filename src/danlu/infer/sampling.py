"""Per-request sampling settings and the next token for every row of a batch, in batched ops.

Each row of a decoding batch may carry its own settings: temperature, top-p, top-k, penalties,
logit bias, seed and log-probabilities. :class:`Sampler` applies them to one step's logits, in
the order transformers' ``generate`` does (penalties and bias, then temperature, top-k, top-p),
and returns one token per row. Log-probabilities are those of the model itself (its raw
distribution, before penalties, bias and temperature), as vLLM reports them by default.

The host work of a step does not grow with the rows' settings: every setting is a column of one
tensor, the penalties' token counts live on the device (built once, then one scatter a step),
and the draw is an inverse-CDF pick against one uniform number per row. Those numbers come from
each row's own Python generator (seeded rows) or a shared one, so a seeded reply does not depend
on what else is in the batch, and the whole step takes one device→host transfer (the tokens).
"""

from __future__ import annotations

import random
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
    """What :class:`Sampler` needs of one row: its settings, tokens so far, and random generator."""

    settings: GenerationSettings
    prompt: list[int]
    generated: list[int]
    rng: random.Random | None = None  # a seeded row's own numbers (None: the shared generator)


_shared = random.Random()  # seeded from the OS: rows without a seed


def rng_for(seed: int | None) -> random.Random | None:
    """A row's own generator for ``seed`` (None without one)."""
    return None if seed is None else random.Random(seed % 2**64)


def to_device(values: list, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """A small host list as a tensor on ``device``. Not through pinned memory: on the H200 (8B
    shape, 32 streamed clients arriving together) pinning each small list cost the first requests
    their first token (p95 4.95 s against 0.98 s unpinned; 181.8 against 276.5 tokens/s)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _penalized(s: GenerationSettings) -> bool:
    return bool(s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty or s.logit_bias)


class Sampler:
    """Picks the next token of every row of one decoding batch, all rows in the same few ops.

    Keeps the batch's penalty state on the device: generated-token counts, prompt-or-generated
    flags and the logit bias, [rows, vocab] each, built from the rows when first needed and then
    updated by one scatter a step. The batch calls :meth:`keep` when rows leave and :meth:`reset`
    when rows join (the state is then rebuilt once from the rows' token lists).
    """

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # [rows, vocab] generated-token counts
        self.seen: torch.Tensor | None = None  # [rows, vocab] in the prompt or generated
        self.bias: torch.Tensor | None = None  # [rows, vocab] logit bias
        self.columns: dict[str, torch.Tensor] = {}  # per-row settings as [rows, 1] columns

    def keep(self, index: torch.Tensor) -> None:
        """Only the rows at ``index`` stay."""
        if self.counts is not None:
            self.counts, self.seen, self.bias = self.counts[index], self.seen[index], self.bias[index]
        self.columns = {k: v[index] for k, v in self.columns.items()}

    def reset(self) -> None:
        self.counts = self.seen = self.bias = None
        self.columns = {}

    def _column(self, name: str, rows: list[Row], device: Any) -> torch.Tensor:
        if name not in self.columns:
            values = [float(getattr(r.settings, name)) for r in rows]
            if name == "temperature":
                values = [v if v > 0 else 1.0 for v in values]  # greedy rows take the argmax
            if name == "top_k":
                values = [v if v > 0 else float("inf") for v in values]
            self.columns[name] = to_device(values, torch.float32, device).unsqueeze(-1)
        return self.columns[name]

    def _build(self, rows: list[Row], vocab: int, device: Any) -> None:
        """The penalty state from the rows' token lists (once after rows join)."""
        n = len(rows)
        at = [i for i, r in enumerate(rows) for _ in r.generated]
        ids = [t for r in rows for t in r.generated]
        self.counts = torch.zeros(n, vocab, device=device)
        self.counts.index_put_(
            (to_device(at, torch.long, device), to_device(ids, torch.long, device)),
            torch.ones(len(ids), device=device),
            accumulate=True,
        )
        at = [i for i, r in enumerate(rows) for _ in r.prompt]
        ids = [t for r in rows for t in r.prompt]
        self.seen = self.counts > 0
        self.seen[to_device(at, torch.long, device), to_device(ids, torch.long, device)] = True
        self.bias = torch.zeros(n, vocab, device=device)
        biased = [(i, t, b) for i, r in enumerate(rows) for t, b in (r.settings.logit_bias or {}).items()]
        if biased:
            i, t, b = zip(*biased, strict=True)
            self.bias[to_device(list(i), torch.long, device), to_device(list(t), torch.long, device)] = (
                to_device(list(b), torch.float32, device)
            )

    def _penalize(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """Repetition, presence and frequency penalties and logit bias, every row at once."""
        if self.counts is None:
            self._build(rows, logits.shape[-1], logits.device)
        assert self.counts is not None and self.seen is not None and self.bias is not None
        rep = self._column("repetition_penalty", rows, logits.device)
        scaled = torch.where(logits < 0, logits * rep, logits / rep)
        logits = torch.where(self.seen, scaled, logits)
        presence = self._column("presence_penalty", rows, logits.device)
        frequency = self._column("frequency_penalty", rows, logits.device)
        return logits - self.counts * frequency - (self.counts > 0) * presence + self.bias

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """Temperature, top-k and top-p, then one inverse-CDF draw per row."""
        device, vocab = logits.device, logits.shape[-1]
        scaled = logits / self._column("temperature", rows, device)
        ks = [min(r.settings.top_k, vocab) if r.settings.top_k > 0 else vocab for r in rows]
        cut_p = any(r.settings.top_p < 1 for r in rows)
        if max(ks) < vocab or cut_p:
            values, index = (
                scaled.topk(max(ks), dim=-1) if max(ks) < vocab else scaled.sort(dim=-1, descending=True)
            )
            if min(ks) < values.shape[-1]:
                rank = torch.arange(values.shape[-1], device=device)
                values = values.masked_fill(rank >= self._column("top_k", rows, device), float("-inf"))
            probs = values.softmax(dim=-1)
            if cut_p:  # tokens after the nucleus go (the first always stays)
                probs = probs.masked_fill(probs.cumsum(-1) - probs >= self._column("top_p", rows, device), 0)
        else:  # the whole distribution: no need to sort it
            probs, index = scaled.softmax(dim=-1), None
        cdf = probs.cumsum(dim=-1)
        draws = [(r.rng or _shared).random() for r in rows]
        target = to_device(draws, torch.float32, device).unsqueeze(-1) * cdf[:, -1:]
        picks = (cdf <= target).sum(dim=-1, keepdim=True).clamp(max=cdf.shape[-1] - 1)
        picks = torch.where(probs.gather(-1, picks) > 0, picks, probs.argmax(-1, keepdim=True))
        return (picks if index is None else index.gather(-1, picks)).squeeze(-1)

    def choose(
        self, logits: torch.Tensor, rows: list[Row], text_of: Any
    ) -> tuple[list[int], list[TokenLogprob | None], torch.Tensor]:
        """The next token of every row from one step's ``logits`` [rows, vocab]: as a list, with a
        logprob entry for rows that asked for one, and as a tensor on the device (the next input).
        ``text_of(row_index, token_id)`` names a token for those entries."""
        logits = logits.float()
        wanted = [i for i, r in enumerate(rows) if r.settings.logprobs is not None]
        raw = logits[wanted].log_softmax(dim=-1) if wanted else None
        if any(_penalized(r.settings) for r in rows):
            logits = self._penalize(logits, rows)
        greedy = [r.settings.temperature <= 0 for r in rows]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, rows)
            if any(greedy):
                flags = to_device(greedy, torch.bool, logits.device)
                tokens = torch.where(flags, logits.argmax(dim=-1), tokens)
        if self.counts is not None:  # this step's tokens count from the next step on
            self.counts.scatter_add_(1, tokens.unsqueeze(-1), torch.ones_like(logits[:, :1]))
            assert self.seen is not None
            self.seen.scatter_(1, tokens.unsqueeze(-1), True)
        chosen = tokens.tolist()
        return chosen, self._entries(raw, wanted, rows, tokens, chosen, text_of), tokens

    @staticmethod
    def _entries(
        raw: torch.Tensor | None,
        wanted: list[int],
        rows: list[Row],
        tokens: torch.Tensor,
        chosen: list[int],
        text_of: Any,
    ) -> list[TokenLogprob | None]:
        """Logprob entries of the rows that asked (three transfers, only on such steps)."""
        entries: list[TokenLogprob | None] = [None] * len(rows)
        if raw is None:
            return entries
        picked = raw.gather(-1, tokens[wanted].unsqueeze(-1)).squeeze(-1)
        values, ids = raw.topk(max(rows[i].settings.logprobs or 0 for i in wanted), dim=-1)
        picked_l, values_l, ids_l = picked.tolist(), values.tolist(), ids.tolist()
        for j, i in enumerate(wanted):
            token, k = chosen[i], rows[i].settings.logprobs or 0
            entry = TokenLogprob(text_of(i, token), token, picked_l[j])
            entry.top = [(text_of(i, t), t, v) for t, v in zip(ids_l[j][:k], values_l[j][:k], strict=True)]
            entries[i] = entry
        return entries
