"""Continuous batching: one thread decodes every running reply together, step by step.

Requests wait in a bounded queue. Between decoding steps, waiting ones join: their prompts are
prefilled as one left-padded batch (long ones in chunks, so running replies keep moving), then
their key/value cache is merged into the running batch (padded on the left to one length).
Finished and cancelled replies leave between steps, and the cache's empty left columns are cut.
Each row keeps its own position ids, sampling settings, stop conditions and random generator.
A step's host work does not go row by row: the rows' last tokens and positions stay on the device
as the next step's inputs, every row's token is picked by one batched :class:`Sampler` and read
back in one transfer, and the readers are woken once the whole step is out.

Rows are grouped by adapter (one forward per adapter in use, with that adapter switched on), so
several adapters over one base are served side by side. Caches made only of transformers'
plain ``DynamicLayer`` are merged; others (sliding-window, linear-attention layers) keep one
batch per arrival wave, still decoded step by step beside the rest.

Why not transformers' own continuous batching (``generate_batch``, its paged cache): it takes
one sampling configuration per manager (temperature, top-k, top-p per request at most), no
penalties, logit bias, per-request seeds or alternatives' logprobs, and no LoRA adapter per
request, all of which the OpenAI API asks for.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from danlu.infer.generation import Detokenizer, Generation, wake_all
from danlu.infer.sampling import GenerationSettings, Row, Sampler, rng_for, to_device


class Busy(Exception):
    """The queue is full: try again in ``retry_after`` seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are waiting already; try again in {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Request:
    """One reply being generated: its prompt, settings, where it stands, and its reader's handle."""

    gen: Generation
    prompt: list[int]
    settings: GenerationSettings
    key: str | None  # adapter name (None: the base)
    stops: set[int]
    tokenizer: Any
    row: Row = field(init=False)
    detok: Detokenizer = field(init=False)
    done: bool = False

    def __post_init__(self) -> None:
        self.row = Row(self.settings, self.prompt, [], rng_for(self.settings.seed))
        self.detok = Detokenizer(self.tokenizer, self.settings.stop)


@dataclass(eq=False)
class Group:
    """Rows decoded by one forward: their cache, padding mask, and prefill progress."""

    key: str | None
    rows: list[Request]
    ids: torch.Tensor | None = None  # left-padded prompts while prefilling
    mask: torch.Tensor | None = None  # [rows, cache columns (+ prompt columns while prefilling)]
    cache: Any = None
    filled: int = 0  # prompt columns already in the cache
    last: torch.Tensor | None = None  # [rows] each row's latest token, the next step's input
    pos: torch.Tensor | None = None  # [rows] each row's tokens in the cache: the next position
    sampler: Sampler = field(default_factory=Sampler)

    @property
    def prefilling(self) -> bool:
        return self.ids is not None


def _plain(cache: Any) -> bool:
    """Whether ``cache`` holds only plain per-token key/value layers, safe to pad, merge and cut."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Batcher:
    """The decoding thread and its queue; started by the first request, gone when idle."""

    def __init__(
        self,
        model: Any,
        device: Any,
        select: Callable[[str | None], AbstractContextManager],
        model_lock: threading.RLock,
        max_batch: int = 32,
        max_waiting: int = 256,
        prefill_tokens: int = 2048,
    ) -> None:
        self.model, self.device, self.select, self.model_lock = model, device, select, model_lock
        self.max_batch, self.max_waiting, self.prefill_tokens = max_batch, max_waiting, prefill_tokens
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.waiting: deque[Request] = deque()
        self.groups: list[Group] = []
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.last_thread: threading.Thread | None = None  # the latest, which may still be ending
        self.steps = 0  # forwards run (for tests and benchmarks)
        self.widest = 0  # most rows decoded in one forward so far

    # ------------------------------------------------------------------ the queue

    def submit(self, request: Request) -> None:
        with self.cond:
            if len(self.waiting) >= self.max_waiting:
                raise Busy(len(self.waiting), 1 + len(self.waiting) // max(1, self.max_batch))
            self.waiting.append(request)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="danlu-decoder", daemon=True)
                self.last_thread = self.thread
                self.thread.start()
            self.cond.notify_all()

    @property
    def active(self) -> int:
        """Requests waiting or being decoded."""
        with self.cond:
            return len(self.waiting) + sum(len(g.rows) for g in self.groups)

    def shutdown(self, timeout: float = 30) -> None:
        """Stop every reply and wait for the decoding thread to end: also one that has just said it
        is done (``self.thread`` cleared) but is still leaving torch's inference mode, so that no
        thread is inside torch while Python exits (which aborted a chat now and then)."""
        with self.cond:
            pending = list(self.waiting) + [r for g in self.groups for r in g.rows]
            thread = self.thread or self.last_thread
        for r in pending:
            r.gen.stop()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _admit(self) -> list[Request]:
        running = sum(len(g.rows) for g in self.groups)
        wave: list[Request] = []
        while self.waiting and running + len(wave) < self.max_batch:
            r = self.waiting[0]
            if r.gen.cancelled.is_set():
                self.waiting.popleft()
                r.gen._finish("stop")
                continue
            self.waiting.popleft()
            wave.append(r)
        return wave

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self.cond:
                        wave = self._admit()
                        if not wave and not self.groups:
                            self.thread = None
                            return
                        self.groups.extend(self._groups_for(wave))
                    for group in list(self.groups):
                        try:
                            self._step(group)
                        except Exception as e:  # noqa: BLE001 - surfaced to this group's readers
                            for r in group.rows:
                                r.done = True
                                r.gen._finish("error", e)
                            with self.cond:
                                self.groups.remove(group)
                    self._merge()
        except BaseException as e:  # the loop itself broke: fail everything, leave room for a new thread
            with self.cond:
                pending = list(self.waiting) + [r for g in self.groups for r in g.rows]
                self.waiting.clear()
                self.groups.clear()
                self.thread = None
            for r in pending:
                r.gen._finish("error", e)
            raise

    def _groups_for(self, wave: list[Request]) -> list[Group]:
        by_key: dict[str | None, list[Request]] = {}
        for r in wave:
            by_key.setdefault(r.key, []).append(r)
        groups = []
        for key, rows in by_key.items():
            width = max(len(r.prompt) for r in rows)
            ids = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r in rows], device=self.device)
            mask = torch.tensor(
                [[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=self.device
            )
            groups.append(Group(key, rows, ids=ids, mask=mask))
        return groups

    def _forward(
        self, group: Group, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        kw: dict[str, Any] = {self.cache_kw: group.cache, "use_cache": True}
        if self.keep_kw:
            kw[self.keep_kw] = 1
        with self.model_lock, self.select(group.key):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)
        cache = getattr(out, "cache", None)
        group.cache = cache if cache is not None else out.past_key_values
        self.steps += 1
        self.widest = max(self.widest, ids.shape[0])
        return out.logits[:, -1, :]

    def _step(self, group: Group) -> None:
        """One prefill chunk or one decoding step of ``group``, then its finished rows leave."""
        for r in group.rows:
            if r.gen.cancelled.is_set() and not r.done:
                self._end(r, "stop")
        if not group.prefilling:
            self._leave(group)
        if all(r.done for r in group.rows):
            with self.cond:
                if group in self.groups:
                    self.groups.remove(group)
            return
        assert group.mask is not None
        if group.prefilling:
            assert group.ids is not None
            width = group.ids.shape[1]
            end = min(width, group.filled + max(1, self.prefill_tokens // len(group.rows)))
            mask = group.mask[:, :end]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, group.filled : end]
            logits = self._forward(group, group.ids[:, group.filled : end], mask, pos)
            group.filled = end
            if end < width:
                return
            group.ids = None
            group.pos = to_device([len(r.prompt) for r in group.rows], torch.long, self.device)
        else:  # every input comes from the device: nothing is built row by row
            assert group.last is not None and group.pos is not None
            group.mask = torch.cat([group.mask, group.mask.new_ones(len(group.rows), 1)], dim=1)
            logits = self._forward(group, group.last[:, None], group.mask, group.pos[:, None])
            group.pos = group.pos + 1
        self._accept(group, logits)
        self._leave(group)

    def _accept(self, group: Group, logits: torch.Tensor) -> None:
        """Pick every row's next token (one batched pick), then hand each reply its text."""
        rows = group.rows
        tokens, entries, group.last = group.sampler.choose(
            logits, [r.row for r in rows], lambda i, t: rows[i].tokenizer.decode([t])
        )
        moved = []
        for r, token, entry in zip(rows, tokens, entries, strict=True):
            if r.done:  # stopped before this step: its pick is dropped with the row
                continue
            r.row.generated.append(token)
            r.gen.completion_tokens += 1
            moved.append(r.gen)
            if token in r.stops:
                self._end(r, "stop", wake=False)
                continue
            delta, hit_stop = r.detok.add(token, entry)
            if delta is not None:
                r.gen._push(delta, wake=False)
            if hit_stop:
                r.done = True
                r.gen._finish("stop", wake=False)
            elif r.gen.completion_tokens >= r.gen.max_new_tokens:
                self._end(r, "length", wake=False)
        wake_all(moved)  # readers woken once the whole step is out: one call per asyncio loop

    def _end(self, r: Request, reason: str, wake: bool = True) -> None:
        r.done = True
        delta = r.detok.flush()
        if delta is not None:
            r.gen._push(delta, wake=False)
        r.gen._finish(reason, wake=wake)

    def _leave(self, group: Group) -> None:
        """Drop finished rows from ``group`` (and its cache), then the cache's empty left columns."""
        keep = [i for i, r in enumerate(group.rows) if not r.done]
        if len(keep) == len(group.rows):
            return
        if not keep:
            with self.cond:
                self.groups.remove(group)
            return
        if group.prefilling:  # only at the end of a prefill, when the first tokens were picked
            return
        index = torch.tensor(keep, device=self.device)
        try:
            group.cache.batch_select_indices(index)
        except Exception:  # noqa: BLE001 - a cache that cannot drop rows keeps them, unread
            return
        assert group.mask is not None and group.last is not None and group.pos is not None
        group.mask, group.last, group.pos = group.mask[index], group.last[index], group.pos[index]
        group.sampler.keep(index)
        group.rows = [group.rows[i] for i in keep]
        if _plain(group.cache):
            first = int(group.mask.any(dim=0).int().argmax())
            if first:
                for layer in group.cache.layers:
                    layer.keys = layer.keys[:, :, first:]
                    layer.values = layer.values[:, :, first:]
                group.mask = group.mask[:, first:]

    def _merge(self) -> None:
        """Join decoding groups of the same adapter into one batch when their caches allow it."""
        with self.cond:
            groups = list(self.groups)
        merged: dict[str | None, Group] = {}
        for g in groups:
            if g.prefilling or g.cache is None or any(r.done for r in g.rows) or not _plain(g.cache):
                continue
            into = merged.get(g.key)
            if into is None:
                merged[g.key] = g
                continue
            assert into.mask is not None and g.mask is not None
            a, b = into.mask.shape[1], g.mask.shape[1]
            width = max(a, b)
            for la, lb in zip(into.cache.layers, g.cache.layers, strict=True):
                la.keys = torch.cat([_pad_left(la.keys, width - a, 2), _pad_left(lb.keys, width - b, 2)])
                la.values = torch.cat(
                    [_pad_left(la.values, width - a, 2), _pad_left(lb.values, width - b, 2)]
                )
            into.mask = torch.cat([_pad_left(into.mask, width - a, 1), _pad_left(g.mask, width - b, 1)])
            assert into.last is not None and g.last is not None and into.pos is not None and g.pos is not None
            into.last, into.pos = torch.cat([into.last, g.last]), torch.cat([into.pos, g.pos])
            into.sampler.reset()  # rebuilt for the joined rows at the next step that needs it
            into.rows = into.rows + g.rows
            with self.cond:
                self.groups.remove(g)


def wait_idle(batcher: Batcher, timeout: float) -> bool:
    """Whether ``batcher`` has nothing waiting or running within ``timeout`` seconds (for tests)."""
    deadline = time.monotonic() + timeout
    while batcher.active:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
