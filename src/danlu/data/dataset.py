"""A data config → tokenized train/eval samples → padded or packed batches.

Steps, in order: read the sources (files, formats, weights, bad-record policy: ``sources``),
shape the records (placeholders, replacements, default system prompt, de-duplication,
sampling), split off evaluation records, tokenize through the chat template on all cores
(``render``), optionally pack (``packing``), and cache the result keyed by everything that
went into it (``cache``). Knows nothing of the model beyond its tokenizer.

Samples hold numpy int32 arrays, not Python lists: half a million samples stay a few hundred
megabytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from danlu.config import DataConfig
from danlu.data import cache, reasoning
from danlu.data.formats import Message, Record, detect_format, record_tools
from danlu.data.packing import pack
from danlu.data.render import (
    IGNORE,
    RAW_ROLES,
    RecordError,
    Sample,
    assistant_spans,
    assistant_spans_many,
    encode_texts,
    label,
    render_raw,
)
from danlu.data.sources import SkipReport, load_sources
from danlu.errors import UserError

log = logging.getLogger(__name__)
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
Conversation = tuple[Record, list[Message]]


@dataclass
class DataSummary:
    """What the data turned into, for the log and the saved run."""

    path: str
    format: str
    records: int
    samples: int
    truncated: int
    tokens: int
    trained_tokens: int
    skipped: int = 0
    skipped_where: list[str] = field(default_factory=list)
    eval_samples: int = 0
    packed_rows: int = 0
    cached: bool = False
    split_documents: int = 0  # long text documents split into windows (data.long_text=window)
    windows: int = 0  # the samples those documents became

    def line(self) -> str:
        extra = (
            f", {self.split_documents} long documents split into {self.windows} windows"
            if self.split_documents
            else ""
        )
        extra += f", {self.eval_samples} eval samples" if self.eval_samples else ""
        extra += f", packed into {self.packed_rows} rows" if self.packed_rows else ""
        extra += f", {self.skipped} bad records skipped" if self.skipped else ""
        extra += " (from cache)" if self.cached else ""
        return (
            f"{self.path}: {self.records} {self.format} records → {self.samples} samples, "
            f"{self.tokens} tokens ({self.trained_tokens} trained), {self.truncated} truncated{extra}"
        )


# ------------------------------------------------------------------------- records


def load_conversations(
    cfg: DataConfig, paths: list[str] | None = None
) -> tuple[list[Conversation], str, Any]:
    """Read and shape the records of ``paths`` (default ``cfg.path``): messages, formats, skip report."""
    conversations, skipped = load_sources(cfg, paths)
    formats = _formats(conversations, cfg)
    shaped = [(record, shape_messages(messages, cfg)) for record, messages in conversations]
    if cfg.dedup:
        seen: set[str] = set()
        unique = []
        for record, messages in shaped:
            key = hashlib.sha1(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                unique.append((record, messages))
        log.info("dedup: %d of %d records were repeats", len(shaped) - len(unique), len(shaped))
        shaped = unique
    if cfg.sample is not None and cfg.sample < len(shaped):
        picked = sorted(random.Random(cfg.seed).sample(range(len(shaped)), cfg.sample))
        shaped = [shaped[i] for i in picked]
    unfilled = {key for _, messages in shaped for m in messages for key in _PLACEHOLDER.findall(m["content"])}
    if unfilled:
        keys = ", ".join(sorted(unfilled))
        log.warning(
            "data still holds placeholders {{%s}}; set data.placeholders.KEY=VALUE to fill them", keys
        )
    return shaped, formats, skipped


def _formats(conversations: list[Conversation], cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    first_by_file: dict[str, Record] = {}
    for record, _ in conversations:
        first_by_file.setdefault(record.path, record)
    names = []
    for record in first_by_file.values():
        try:
            names.append(record.format or detect_format(record))
        except UserError:
            names.append("?")
    return "+".join(sorted(set(names))) or "?"


def shape_messages(messages: list[Message], cfg: DataConfig) -> list[Message]:
    """Placeholders, plain replacements, the default system prompt, reasoning kept or stripped
    (SFT records, and the preference objectives' prompt + replies)."""
    if cfg.placeholders or cfg.replace:
        out = []
        for m in messages:
            content = m["content"]
            for key, value in cfg.placeholders.items():
                content = content.replace("{{" + key + "}}", value)
            for old, new in cfg.replace.items():
                content = content.replace(old, new)
            out.append({**m, "content": content})
        messages = out
    raw = messages[0]["role"] in ("text", "prompt")
    if cfg.system is not None and not raw and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system}, *messages]
    if not raw and not any(m["role"] == "assistant" for m in messages):
        raise UserError("a record has no assistant reply to train on")
    if cfg.reasoning == "strip":
        messages = reasoning.strip(messages)
    return messages


def split_eval(conversations: list[Conversation], ratio: float, seed: int) -> tuple[list, list]:
    """Hold out ``ratio`` of the conversations (at least one when ratio > 0)."""
    if ratio <= 0:
        return conversations, []
    n_eval = max(1, round(len(conversations) * ratio))
    if n_eval >= len(conversations):
        raise UserError(f"data.eval_ratio={ratio} leaves no training records; lower it")
    held = set(random.Random(seed + 1).sample(range(len(conversations)), n_eval))
    train = [c for i, c in enumerate(conversations) if i not in held]
    return train, [c for i, c in enumerate(conversations) if i in held]


# ---------------------------------------------------------------------- tokenizing

_WORKER: dict[str, Any] = {}
_SKIP_HINT = "; data.on_error=skip leaves such records out"


def _tokenize_chunk(
    chunk: list[tuple[str, list[Message], Any]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list, np.ndarray, list[tuple[int, str]]]:
    """Tokenize a chunk in a worker: flat ids, flat labels, per-sample lengths, truncation and
    owner (the conversation's index in the chunk), and the conversations refused as bad records.

    Templates render in batched calls; the tokenizer then runs once for the chunk.
    """
    w = _WORKER
    tok, max_length, loss_on, kw = w["tokenizer"], w["max_length"], w["loss_on"], w["template_kwargs"]
    refused: list[tuple[int, str]] = []

    def refuse(i: int, e: RecordError) -> None:
        if not w["skip"]:
            hint = _SKIP_HINT if w["on_error"] == "raise" else ""
            raise UserError(f"{chunk[i][0]}: {e}{hint}") from None
        refused.append((i, str(e)))

    chats = [
        i
        for i, (_, messages, tools) in enumerate(chunk)
        if messages[0]["role"] not in RAW_ROLES and not tools
    ]
    try:
        batched = dict(
            zip(chats, assistant_spans_many(tok, [chunk[i][1] for i in chats], loss_on, kw), strict=True)
        )
    except Exception:  # noqa: BLE001 - one record is at fault: the loop below names it
        batched = {}
    samples: list[tuple[int, Sample]] = []
    texts, spans, owners = [], [], []
    for i, (where, messages, tools) in enumerate(chunk):
        try:
            if messages[0]["role"] in RAW_ROLES:
                samples += [(i, s) for s in render_raw(tok, messages, max_length, w["overlap"])]
                continue
            renderings = batched[i] if i in batched else assistant_spans(tok, messages, tools, loss_on, kw)
        except RecordError as e:
            refuse(i, e)
            continue
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        for text, turn_spans in renderings:
            texts.append(text)
            spans.append(turn_spans)
            owners.append(i)
    for i, encoded in zip(owners, _encode(tok, texts, spans, owners, refuse), strict=True):
        if encoded is not None:
            try:
                samples.append((i, label(tok, *encoded, max_length, w["stop_ids"], loss_on)))
            except UserError as e:
                raise UserError(f"{chunk[i][0]}: {e}") from None
    samples.sort(key=lambda pair: pair[0])  # stable: a conversation's samples stay in order
    done = [s for _, s in samples]
    return (
        np.concatenate([s.input_ids for s in done]) if done else np.zeros(0, np.int32),
        np.concatenate([s.labels for s in done]) if done else np.zeros(0, np.int32),
        np.asarray([len(s.input_ids) for s in done], np.int64),
        [s.truncated for s in done],
        np.asarray([i for i, _ in samples], np.int64),
        refused,
    )


def _encode(
    tok: Any, texts: list[str], spans: list[list[tuple[int, int]]], owners: list[int], refuse: Any
) -> list[tuple[np.ndarray, list[tuple[int, int]]] | None]:
    """:func:`encode_texts` for all texts in one call; when a record is refused (a slow
    tokenizer's token across a turn's edge), again one record at a time to find it: its texts
    come back as None."""
    try:
        return list(encode_texts(tok, texts, spans))
    except RecordError:
        pass
    out: list[tuple[np.ndarray, list[tuple[int, int]]] | None] = []
    for i, group in itertools.groupby(range(len(texts)), key=owners.__getitem__):  # owners ascend
        each = list(group)
        try:
            out += encode_texts(tok, [texts[k] for k in each], [spans[k] for k in each])
        except RecordError as e:
            refuse(i, e)
            out += [None] * len(each)
    return out


def _tokenize(
    conversations: list[Conversation], tokenizer: Any, cfg: DataConfig, stop_ids: set[int], skip: bool
) -> tuple[list[Sample], np.ndarray, list[tuple[int, str]]]:
    """Every sample of ``conversations`` in order, the index of the conversation each came
    from, and (index, reason) of the conversations refused as bad records (only when ``skip``;
    else the first raises). On ``cfg.num_proc`` processes (0: all cores) for large sets."""
    _WORKER.update(
        tokenizer=tokenizer,
        max_length=cfg.max_seq_length,
        stop_ids=stop_ids,
        loss_on=cfg.loss_on,
        skip=skip,
        on_error=cfg.on_error,
        template_kwargs=dict(cfg.template_kwargs),
        overlap=cfg.window_overlap if cfg.long_text == "window" else None,
    )
    items = [(r.where(), m, record_tools(r)) for r, m in conversations]
    size = 1000
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    procs = cfg.num_proc or os.cpu_count() or 1
    try:
        if procs > 1 and len(chunks) > 1 and "fork" in mp.get_all_start_methods():
            # fork: workers inherit the tokenizer instead of unpickling it
            with mp.get_context("fork").Pool(min(procs, len(chunks))) as pool:
                parts = pool.map(_tokenize_chunk, chunks, chunksize=1)
        else:
            parts = [_tokenize_chunk(c) for c in chunks]
    finally:
        _WORKER.clear()
    samples: list[Sample] = []
    refused: list[tuple[int, str]] = []
    for offset, (ids, labels, lengths, truncated, _, bad) in zip(
        range(0, len(items), size), parts, strict=True
    ):
        ends = np.cumsum(lengths)
        for end, n, cut in zip(ends, lengths, truncated, strict=True):
            samples.append(Sample(ids[end - n : end], labels[end - n : end], cut))
        refused += [(offset + i, reason) for i, reason in bad]
    owners = np.concatenate(
        [part[4] + offset for offset, part in zip(range(0, len(items), size), parts, strict=True)]
        or [np.zeros(0, np.int64)]
    )
    return samples, owners, refused


def tokenize_records(
    conversations: list[Conversation],
    tokenizer: Any,
    cfg: DataConfig,
    stop_ids: set[int],
    skipped: SkipReport | None = None,
) -> list[tuple[Conversation, list[Sample]]]:
    """Each conversation with the samples it trains as: one, or more where the chat template
    renders earlier replies differently later on (see :mod:`danlu.data.render`).

    A record the template refuses raises, naming file and line; with ``data.on_error=skip``
    and a ``skipped`` report, it is left out and added to the report instead.
    """
    skip = cfg.on_error == "skip" and skipped is not None
    samples, owners, refused = _tokenize(conversations, tokenizer, cfg, stop_ids, skip)
    if skipped is not None:
        for i, reason in refused:
            skipped.add(conversations[i][0].where(), reason)
    starts = np.searchsorted(owners, np.arange(len(conversations) + 1), "left")
    out = []
    gone = {i for i, _ in refused}
    for k, conversation in enumerate(conversations):
        if k not in gone:
            out.append((conversation, samples[starts[k] : starts[k + 1]]))
    return out


def tokenize(
    conversations: list[Conversation], tokenizer: Any, cfg: DataConfig, stop_ids: set[int]
) -> list[Sample]:
    """One sample per conversation, in order, for callers that pair samples with records.

    A record that trains as several samples comes back as their concatenation (its tokens, as
    many as training spends on it); a record the template refuses raises, whatever
    ``data.on_error`` says. :func:`tokenize_records` has neither limit.
    """
    out = []
    for _, samples in tokenize_records(conversations, tokenizer, cfg, stop_ids):
        if len(samples) == 1:
            out.append(samples[0])
        else:
            out.append(
                Sample(
                    np.concatenate([s.input_ids for s in samples]),
                    np.concatenate([s.labels for s in samples]),
                    any(s.truncated for s in samples),
                )
            )
    return out


def _keep_trainable(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if (np.asarray(s.labels[1:]) != IGNORE).any()]


def _samples(
    conversations: list[Conversation],
    tokenizer: Any,
    cfg: DataConfig,
    stop_ids: set[int],
    skipped: SkipReport,
) -> tuple[list[Sample], int, tuple[int, int]]:
    """The trainable samples of ``conversations``, how many records the template refused, and
    (documents split into windows, windows)."""
    if not conversations:
        return [], 0, (0, 0)
    samples, owners, refused = _tokenize(conversations, tokenizer, cfg, stop_ids, cfg.on_error == "skip")
    counts = np.bincount(owners, minlength=len(conversations)) if len(owners) else np.zeros(0, np.int64)
    split = [n for k, n in enumerate(counts) if n > 1 and conversations[k][1][0]["role"] == "text"]
    for i, reason in refused:
        skipped.add(conversations[i][0].where(), reason)
    if len(refused) == len(conversations):
        where, reason = skipped.items[-len(refused)]
        raise UserError(
            f"all {len(refused)} records are bad under this chat template, e.g. {where}: {reason}"
        )
    return _keep_trainable(samples), len(refused), (len(split), int(sum(split)))


def build(
    cfg: DataConfig, tokenizer: Any, stop_ids: set[int]
) -> tuple[list[Sample], list[Sample], DataSummary]:
    """Train samples, eval samples and a summary, from the cache when nothing changed."""
    key = cache.key(cfg, tokenizer, stop_ids) if cfg.cache else None
    hit = cache.load(key) if key else None
    if hit is not None:
        train, evals, saved = hit
        summary = DataSummary(**saved)
        summary.cached = True
        return train, evals, summary
    conversations, formats, skipped = load_conversations(cfg)
    train_convs, eval_convs = split_eval(conversations, cfg.eval_ratio, cfg.seed)
    if cfg.eval_path:
        eval_convs, _, eval_skipped = load_conversations(cfg, cfg.eval_path)
        skipped.items += eval_skipped.items
    train, refused, (split, windows) = _samples(train_convs, tokenizer, cfg, stop_ids, skipped)
    evals, refused_evals, _ = _samples(eval_convs, tokenizer, cfg, stop_ids, skipped)
    if not cfg.eval_path:
        refused += refused_evals  # held out of this data, so no longer among its records
    if not train:
        raise UserError(
            f"{', '.join(cfg.path)}: no sample has trained tokens left within data.max_seq_length="
            f"{cfg.max_seq_length}; raise it"
        )
    summary = DataSummary(
        path=", ".join(cfg.path),
        format=formats,
        records=len(conversations) - refused,
        samples=len(train),
        truncated=sum(s.truncated for s in train),
        tokens=sum(len(s.input_ids) for s in train),
        trained_tokens=sum(s.trained_tokens for s in train),
        skipped=skipped.count,
        skipped_where=[where for where, _ in skipped.items][:100],
        eval_samples=len(evals),
        split_documents=split,
        windows=windows,
    )
    if cfg.packing:
        train = pack(train, cfg.max_seq_length)
        evals = pack(evals, cfg.max_seq_length) if evals else []
        summary.packed_rows = len(train)
    if key:
        cache.save(key, train, evals, dataclasses.asdict(summary))
    return train, evals, summary


# ------------------------------------------------------------------------ batching


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order of ``n`` samples that depends only on (seed, epoch): resumable."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def micro_batches(samples: list[Sample], batch_size: int, seed: int, skip: int = 0) -> Iterator[list[Sample]]:
    """Endless micro-batches, epoch after epoch (the last partial batch of an epoch is kept).

    ``skip`` jumps over that many micro-batches without building them: how a resumed run
    continues mid-epoch with exactly the batches the interrupted run would have seen.
    """
    per_epoch = -(-len(samples) // batch_size)
    epoch, offset = divmod(skip, per_epoch)
    while True:
        order = epoch_order(len(samples), seed, epoch)
        for i in range(offset * batch_size, len(order), batch_size):
            yield [samples[j] for j in order[i : i + batch_size]]
        epoch, offset = epoch + 1, 0


def collate(batch: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. Padded rows get an attention mask; packed rows get restarting
    position ids instead (and padding becomes one more short segment that nothing attends to)."""
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    packed = batch[0].position_ids is not None
    extra = torch.zeros((len(batch), width), dtype=torch.long)
    for row, s in enumerate(batch):
        n = len(s.input_ids)
        ids[row, :n] = torch.from_numpy(np.array(s.input_ids, dtype=np.int64))
        labels[row, :n] = torch.from_numpy(np.array(s.labels, dtype=np.int64))
        if packed:
            extra[row, :n] = torch.from_numpy(np.array(s.position_ids, dtype=np.int64))
            extra[row, n:] = torch.arange(width - n)
        else:
            extra[row, :n] = 1
    key = "position_ids" if packed else "attention_mask"
    return {"input_ids": ids, "labels": labels, key: extra}
