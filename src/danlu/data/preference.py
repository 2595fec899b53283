"""Preference data: records → a prompt and two replies (pairs) or one labelled reply (KTO) → tokens.

Shapes read (auto-detected per record, errors name file and line):

- pairs, strings: ``{"prompt": "...", "chosen": "...", "rejected": "..."}`` (optional ``system``);
  the prompt is a user message, the replies assistant messages, all through the chat template;
- pairs, OpenAI: ``{"messages": [...], "chosen": ..., "rejected": ...}`` (``prompt`` may be such a
  list too, as TRL's conversational data has it);
- pairs, ShareGPT: ``{"conversations": [...], "chosen": ..., "rejected": ...}``;
- KTO: ``{"messages": [..., {"role": "assistant", ...}], "label": true}``, or ``prompt`` +
  ``completion`` (texts or message lists), or ShareGPT ``conversations``, each with a boolean ``label``.

A reply (``chosen``, ``rejected``, ``completion``) is text, one message (``content`` or
``value``), or a list holding one assistant message. Each branch is rendered by
:mod:`danlu.data.render` exactly as SFT renders that turn (same template, same stop-token check):
the prompt is the tokens before the reply, the reply the turn's trained tokens. Too long, the prompt
keeps its end and the replies their starts; the summary says how many lost part of a reply.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from danlu.config import DataConfig
from danlu.data.dataset import DataSummary, collate, shape_messages, split_eval
from danlu.data.formats import Message, Record, apply_columns, to_messages
from danlu.data.render import IGNORE, Sample, assistant_spans, encode_texts, label
from danlu.data.sources import SkipReport, expand, read_file
from danlu.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Pair:
    """A prompt and two replies, as token ids; ``ref``: cached reference log-probs (chosen, rejected)."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    truncated: bool = False
    ref: tuple[float, float] | None = None


@dataclass
class Labelled:
    """KTO: a prompt, a reply and whether it is desirable; ``other`` is another record's reply to
    this prompt, for the KL estimate. ``ref``: cached reference log-probs (reply, other)."""

    prompt: np.ndarray
    reply: np.ndarray
    desirable: bool
    other: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    truncated: bool = False
    ref: tuple[float, float] | None = None


Item = Pair | Labelled


def kind(data: Any) -> str | None:
    """``pairs``, ``kto`` or None (not a preference record), from a record's keys."""
    if not isinstance(data, dict):
        return None
    if "chosen" in data and "rejected" in data:
        return "pairs"
    if "label" in data and ("messages" in data or "conversations" in data or "completion" in data):
        return "kto"
    return None


# ------------------------------------------------------------------------- records


def _prompt(record: Record, key: str) -> list[Message]:
    d = record.data
    value = d.get(key)
    if key == "prompt" and isinstance(value, str):
        if not value.strip():
            raise UserError(f"{record.where()}: field 'prompt' is empty")
        messages = [{"role": "user", "content": value}]
    elif key == "conversations":
        messages = to_messages(Record({"conversations": value}, record.path, record.line), "sharegpt")
    else:
        messages = to_messages(Record({"messages": value}, record.path, record.line), "messages")
    system = d.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def _reply(record: Record, key: str) -> str:
    """A reply field as text: text, one message, or a list holding one assistant message."""
    value = record.data.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from", "assistant"))
        if role not in ("assistant", "gpt"):
            raise UserError(f"{record.where()}: field '{key}' must be an assistant reply, got role {role!r}")
        value = value.get("content", value.get("value"))
    if not isinstance(value, str) or not value.strip():
        raise UserError(
            f"{record.where()}: field '{key}' must be a non-empty reply: text, one message, "
            "or a list holding one assistant message"
        )
    return value


def parse(record: Record) -> tuple[str, list[Message], list[str], bool | None]:
    """(kind, prompt messages, replies, label): pairs have two replies and no label."""
    d = record.data
    which = kind(d)
    if which is None:
        raise UserError(
            f"{record.where()}: not a preference record (keys {sorted(d) if isinstance(d, dict) else d}); "
            "expected prompt/messages/conversations with chosen and rejected, or a KTO record with label"
        )
    source = next((k for k in ("messages", "conversations", "prompt") if k in d), None)
    if which == "pairs":
        if source is None:
            raise UserError(
                f"{record.where()}: a pair needs its prompt: field 'prompt', 'messages' or 'conversations'"
            )
        return which, _prompt(record, source), [_reply(record, "chosen"), _reply(record, "rejected")], None
    flag = d["label"]
    if not isinstance(flag, bool) and flag not in (0, 1):
        raise UserError(f"{record.where()}: field 'label' must be true or false, got {flag!r}")
    if "completion" in d:
        if "prompt" not in d:
            raise UserError(f"{record.where()}: a KTO completion needs its field 'prompt'")
        return which, _prompt(record, "prompt"), [_reply(record, "completion")], bool(flag)
    messages = _prompt(record, source)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise UserError(f"{record.where()}: a KTO conversation must end with the assistant reply it labels")
    return which, messages[:-1], [messages[-1]["content"]], bool(flag)


Parsed = tuple[Record, list[Message], list[str], bool | None]


def load(cfg: DataConfig, objective: str, paths: list[str] | None = None) -> tuple[list[Parsed], SkipReport]:
    """Every record of ``paths`` (default ``cfg.path``) parsed, shaped, of the kind ``objective`` reads."""
    if cfg.weights:
        raise UserError("data.weights is not supported with preference objectives yet; remove it")
    want = "kto" if objective == "kto" else "pairs"
    skipped, out = SkipReport(), []
    for entry in paths if paths is not None else cfg.path:
        for path in expand(entry):
            for raw in read_file(path, skipped if cfg.on_error == "skip" else None):
                record = apply_columns(raw, cfg.columns)
                try:
                    which, prompt, replies, flag = parse(record)
                    if which != want:
                        fix = (
                            "train.objective=kto" if which == "kto" else "train.objective=dpo, orpo or simpo"
                        )
                        raise UserError(
                            f"{record.where()}: a {which} record, which train.objective={objective} "
                            f"does not read; set {fix}"
                        )
                    shaped = shape_messages(
                        [*prompt, *({"role": "assistant", "content": r} for r in replies)], cfg
                    )
                except UserError as e:
                    if cfg.on_error != "skip":
                        raise
                    skipped.add(record.where(), str(e).removeprefix(f"{record.where()}: "))
                    continue
                record.format = which
                out.append(
                    (record, shaped[: -len(replies)], [m["content"] for m in shaped[-len(replies) :]], flag)
                )
    if not out:
        raise UserError(f"{', '.join(cfg.path)}: no usable preference record ({skipped.line()})")
    if cfg.sample is not None and cfg.sample < len(out):
        out = [out[i] for i in sorted(random.Random(cfg.seed).sample(range(len(out)), cfg.sample))]
    return out, skipped


# ---------------------------------------------------------------------- tokenizing


def encode_reply(
    tokenizer: Any,
    prompt: list[Message],
    reply: str,
    stop_ids: set[int],
    template_kwargs: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, reply ids): the reply as SFT trains it after ``prompt``, with its stop token."""
    messages = [*prompt, {"role": "assistant", "content": reply}]
    renderings = assistant_spans(
        tokenizer, messages, loss_on="last_assistant", template_kwargs=template_kwargs or None
    )
    text, spans = next((t, s) for t, s in renderings if s)
    [(ids, ranges)] = encode_texts(tokenizer, [text], [spans])
    label(tokenizer, ids, ranges, len(ids), stop_ids)  # refuses a template that never stops
    first, last = ranges[-1]
    return ids[:first], ids[first:last]


def fit(
    prompt: np.ndarray, replies: list[np.ndarray], max_length: int
) -> tuple[np.ndarray, list[np.ndarray], bool]:
    """Cut a prompt and its replies to ``max_length`` per branch: the prompt keeps its end (at
    least half the budget when the replies are long), each reply its start. True when a reply
    lost tokens."""
    longest = max(len(r) for r in replies)
    if len(prompt) + longest <= max_length:
        return prompt, replies, False
    keep = min(len(prompt), max(max_length - longest, max_length // 2))
    prompt = prompt[len(prompt) - keep :]
    budget = max_length - len(prompt)
    return prompt, [r[:budget] for r in replies], longest > budget


def tokenize(
    parsed: list[Parsed],
    tokenizer: Any,
    cfg: DataConfig,
    stop_ids: set[int],
    skipped: SkipReport | None = None,
) -> list[Item]:
    """Token ids of every record; KTO replies get the previous record's reply as ``other``. A
    record the template cannot render is an error, or, with ``data.on_error=skip``, left out."""
    items: list[Item] = []
    for record, prompt, replies, flag in parsed:
        try:
            encoded = [encode_reply(tokenizer, prompt, r, stop_ids, cfg.template_kwargs) for r in replies]
            if any(len(p) != len(encoded[0][0]) or (p != encoded[0][0]).any() for p, _ in encoded):
                raise UserError("the chat template renders the prompt differently per reply")
        except UserError as e:
            if cfg.on_error != "skip" or skipped is None:
                raise UserError(f"{record.where()}: {e}") from None
            skipped.add(record.where(), str(e))
            continue
        ids, cut, lost = fit(encoded[0][0], [r for _, r in encoded], cfg.max_seq_length)
        if flag is None:
            items.append(Pair(ids, cut[0], cut[1], lost))
        else:
            items.append(Labelled(ids, cut[0], flag, truncated=lost))
    for i, item in enumerate(items):
        if isinstance(item, Labelled):
            other = items[i - 1].reply  # the previous record's reply (the last's for the first)
            item.other = other[: max(cfg.max_seq_length - len(item.prompt), 1)]
    return [i for i in items if all(len(r) for r in _replies(i))]


def _replies(item: Item) -> list[np.ndarray]:
    return [item.chosen, item.rejected] if isinstance(item, Pair) else [item.reply]


def build(
    cfg: DataConfig, tokenizer: Any, stop_ids: set[int], objective: str
) -> tuple[list[Item], list[Item], DataSummary]:
    """Train items, eval items and a summary (like :func:`danlu.data.dataset.build`, uncached)."""
    parsed, skipped = load(cfg, objective)
    train_part, eval_part = split_eval(parsed, cfg.eval_ratio, cfg.seed)
    if cfg.eval_path:
        eval_part, more = load(cfg, objective, cfg.eval_path)
        skipped.items += more.items
    train = tokenize(train_part, tokenizer, cfg, stop_ids, skipped)
    evals = tokenize(eval_part, tokenizer, cfg, stop_ids, skipped)
    if not train:
        raise UserError(
            f"{', '.join(cfg.path)}: no record has a reply left within data.max_seq_length; raise it"
        )
    rows = [r for item in train for r in rows_of(item)]
    summary = DataSummary(
        path=", ".join(cfg.path),
        format="kto" if objective == "kto" else "pairs",
        records=len(train) + len(evals),
        samples=len(train),
        truncated=sum(i.truncated for i in train),
        tokens=sum(len(r.input_ids) for r in rows),
        trained_tokens=sum(r.trained_tokens for r in rows),
        skipped=skipped.count,
        skipped_where=[where for where, _ in skipped.items][:100],
        eval_samples=len(evals),
    )
    return train, evals, summary


# ------------------------------------------------------------------------ batching


def row(prompt: np.ndarray, reply: np.ndarray) -> Sample:
    ids = np.concatenate([prompt, reply]).astype(np.int32)
    labels = np.concatenate([np.full(len(prompt), IGNORE, np.int32), reply.astype(np.int32)])
    return Sample(ids, labels)


def rows_of(item: Item) -> list[Sample]:
    """The rows an item trains: chosen and rejected, or the KTO reply."""
    return [row(item.prompt, r) for r in _replies(item)]


def collate_items(batch: list[Item], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of every branch: pairs as ``[chosen..., rejected...]``, KTO replies as
    ``[reply..., other...]`` (the mismatched replies last), so one forward runs them together."""
    if isinstance(batch[0], Pair):
        rows = [row(p.prompt, p.chosen) for p in batch] + [row(p.prompt, p.rejected) for p in batch]
    else:
        rows = [row(k.prompt, k.reply) for k in batch] + [row(k.prompt, k.other) for k in batch]
    return collate(rows, pad_id)


def preview(item: Item, tokenizer: Any) -> list[tuple[str, str, str]]:
    """Each branch of an item as (name, prompt text, trained text), for ``danlu data preview``."""
    names = (
        ["chosen", "rejected"]
        if isinstance(item, Pair)
        else ["desirable" if item.desirable else "undesirable"]
    )
    prompt = tokenizer.decode(item.prompt)
    return [(n, prompt, tokenizer.decode(r)) for n, r in zip(names, _replies(item), strict=True)]


def preview_text(items: list[Item], tokenizer: Any, limit: int = 3) -> str:
    """Both branches of the first ``limit`` items, the trained reply in ``[[...]]`` (for ``danlu data
    preview``: ``build(...)`` then this)."""
    out = []
    for n, item in enumerate(items[:limit]):
        for name, prompt, reply in preview(item, tokenizer):
            out.append(f"--- item {n} · {name}\n{prompt}[[{reply}]]")
    return "\n".join(out)
