"""Data as training will read it, file by file, for ``danlu data check`` and ``stats``.

Each file goes through the training path (``load_conversations`` → ``tokenize_records``) with
bad records collected rather than raised, so one run shows everything that training would
stop at or leave out. What comes back per file: its records and their untruncated samples,
what was skipped and why, or why the whole file is refused (preference data, all records
bad); :func:`report` turns it into the lines ``check`` prints, headed by a one-line verdict
(what the data is, what trains, what is refused or dropped, and why).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

import numpy as np

from danlu.config import DataConfig
from danlu.data.dataset import Conversation, load_conversations, tokenize_records
from danlu.data.formats import record_tools
from danlu.data.reasoning import has_reasoning
from danlu.data.render import IGNORE, Sample, windows
from danlu.data.sources import SkipReport, expand
from danlu.errors import UserError

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_KINDS = {
    "alpaca": "alpaca instructions",
    "messages": "chats (messages)",
    "sharegpt": "chats (sharegpt)",
    "conversation": "chats (conversation)",
    "text": "text documents",
    "completion": "prompt/completion pairs",
}


@dataclasses.dataclass
class Inspection:
    """One file read and tokenized in full (no truncation), plus what training would cut."""

    name: str
    formats: str
    conversations: list[Conversation]  # the records that train (refused ones are in skipped)
    samples: list[list[Sample]]  # per record, untruncated: lengths show how far past the limit
    skipped: SkipReport
    cfg: DataConfig
    refusal: str | None = None  # why the whole file is refused

    @property
    def max_length(self) -> int:
        return self.cfg.max_seq_length

    @property
    def flat(self) -> list[Sample]:
        return [s for group in self.samples for s in group]


def inspect(cfg: DataConfig, entry: str, tokenizer: Any, stop_ids: set[int]) -> list[Inspection]:
    """Each file of ``entry`` (a file, folder or glob), read as training reads it; bad records
    are collected (``data.on_error=skip``) and reported, not raised."""
    return [_inspect_file(cfg, str(path), tokenizer, stop_ids) for path in expand(entry)]


def _inspect_file(cfg: DataConfig, path: str, tokenizer: Any, stop_ids: set[int]) -> Inspection:
    collect = dataclasses.replace(cfg, on_error="skip", weights=[])
    try:
        conversations, formats, skipped = load_conversations(collect, [path])
    except UserError as e:  # the whole file: preference data, every record bad, unreadable
        return Inspection(path, "?", [], [], SkipReport(), cfg, refusal=str(e))
    whole = dataclasses.replace(collect, max_seq_length=sys.maxsize, long_text="truncate")
    pairs = tokenize_records(conversations, tokenizer, whole, stop_ids, skipped)
    return Inspection(path, formats, [c for c, _ in pairs], [s for _, s in pairs], skipped, cfg)


def length_stats(values: list[int]) -> dict[str, int]:
    """min / median / p95 / max of ``values`` (rounded to whole numbers)."""
    if not values:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    a = np.asarray(values)
    return {
        "min": int(a.min()),
        "median": round(float(np.median(a))),
        "p95": round(float(np.percentile(a, 95))),
        "max": int(a.max()),
    }


def turn_counts(conversations: list[Conversation]) -> list[int]:
    """User plus assistant messages per record."""
    return [sum(m["role"] in ("user", "assistant") for m in msgs) for _, msgs in conversations]


def _is_text(conversation: Conversation) -> bool:
    return conversation[1][0]["role"] == "text"


def trained_after_cut(sample: Sample, max_length: int) -> int:
    """Trained tokens left once truncated to ``max_length``; 0 when training would drop the sample."""
    labels = np.asarray(sample.labels[:max_length])
    if not (labels[1:] != IGNORE).any():  # as dataset._keep_trainable: label 0 predicts nothing
        return 0
    return int((labels != IGNORE).sum())


def _windowed(ins: Inspection) -> bool:
    return ins.cfg.long_text == "window"


def trained(ins: Inspection) -> int:
    """Tokens training will train: text documents over the limit as windows (every token once),
    everything else after truncation."""
    total = 0
    for conversation, group in zip(ins.conversations, ins.samples, strict=True):
        for s in group:
            if _windowed(ins) and _is_text(conversation) and len(s.input_ids) > ins.max_length:
                total += int((np.asarray(s.labels) != IGNORE).sum())
            else:
                total += trained_after_cut(s, ins.max_length)
    return total


def split_documents(ins: Inspection) -> tuple[int, int]:
    """(text documents longer than the limit, the windows they become) under long_text=window."""
    if not _windowed(ins):
        return 0, 0
    long = [
        len(s.input_ids)
        for conversation, group in zip(ins.conversations, ins.samples, strict=True)
        for s in group
        if _is_text(conversation) and len(s.input_ids) > ins.max_length
    ]
    return len(long), sum(len(windows(n, ins.max_length, ins.cfg.window_overlap)) for n in long)


def truncated(ins: Inspection) -> int:
    """Samples training cuts at the limit (documents split into windows are not cut)."""
    return sum(
        len(s.input_ids) > ins.max_length and not (_windowed(ins) and _is_text(conversation))
        for conversation, group in zip(ins.conversations, ins.samples, strict=True)
        for s in group
    )


def problems(ins: Inspection) -> list[str]:
    """What would go wrong or be lost in training, one line each."""
    found = []
    if ins.skipped.count:
        found.append(ins.skipped.line())
    unfilled: dict[str, str] = {}
    for record, msgs in ins.conversations:
        for m in msgs:
            for key in _PLACEHOLDER.findall(m["content"]):
                unfilled.setdefault(key, record.where())
    for key, where in unfilled.items():
        found.append(
            f"unfilled placeholder {{{{{key}}}}} (first at {where}); set data.placeholders.{key}=VALUE"
        )
    empty = _empty(ins)
    if empty:
        found.append(
            f"{len(empty)} sample(s) have no trained tokens left after truncation at data.max_seq_length="
            f"{ins.max_length} (first at {empty[0]}); they are dropped in training"
        )
    return found


def _empty(ins: Inspection) -> list[str]:
    """Where the samples are that training drops: nothing trained left after truncation."""
    return [
        r.where()
        for (r, msgs), group in zip(ins.conversations, ins.samples, strict=True)
        for s in group
        if not (_windowed(ins) and msgs[0]["role"] == "text") and not trained_after_cut(s, ins.max_length)
    ]


def verdict(ins: Inspection) -> str:
    """One line: what the file is, what trains, what is refused or dropped, and why."""
    if ins.refusal:
        return f"refused, nothing trains: {ins.refusal.removeprefix(f'{ins.name}: ')}"
    kinds = " + ".join(_KINDS.get(f, f) for f in ins.formats.split("+"))
    extras = [
        what
        for what, hit in (
            ("tools", any(record_tools(r) for r, _ in ins.conversations)),
            ("tool calls", any(m.get("tool_calls") for _, msgs in ins.conversations for m in msgs)),
            ("reasoning", any(has_reasoning(msgs) for _, msgs in ins.conversations)),
        )
        if hit
    ]
    kinds += f" with {', '.join(extras)}" if extras else ""
    n = len(ins.conversations)
    records = "1 record trains" if n == 1 else f"{n} records train"
    parts = [f"{kinds}: {records} {trained(ins)} tokens ({_what(ins)})"]
    split, n_windows = split_documents(ins)
    if split:
        parts.append(f"{split} long document{'s' if split != 1 else ''} split into {n_windows} windows")
    cut = truncated(ins)
    if cut:
        parts.append(f"{cut} samples truncated at {ins.max_length} tokens")
    if _empty(ins):
        parts.append(f"{len(_empty(ins))} samples dropped (nothing trained left after truncation)")
    if ins.skipped.count:
        where, reason = ins.skipped.items[0]
        stop = (
            "training stops at the first (data.on_error=raise)"
            if ins.cfg.on_error == "raise"
            else "skipped in training"
        )
        parts.append(f"{ins.skipped.count} refused, e.g. {where}: {reason}; {stop}")
    return "; ".join(parts)


def _what(ins: Inspection) -> str:
    """Which tokens train, in words."""
    roles = {m["role"] for _, msgs in ins.conversations for m in msgs}
    said = []
    if "text" in roles:
        said.append("text: every token")
    if "completion" in roles:
        said.append("completions")
    if "assistant" in roles:
        said.append("every token" if ins.cfg.loss_on == "all" else _replies(ins, roles))
    return ", ".join(said) or "nothing"


def _replies(ins: Inspection, roles: set[str]) -> str:
    which = "the last assistant reply" if ins.cfg.loss_on == "last_assistant" else "assistant replies"
    if any(m.get("tool_calls") for _, msgs in ins.conversations for m in msgs):
        which += " and tool calls"
    if any(m.get("train") is False for _, msgs in ins.conversations for m in msgs):
        which += ", not those with loss weight 0"
    return which + ("; tool results are context" if "tool" in roles else "")


def report(ins: Inspection) -> list[str]:
    """The lines ``check`` and ``stats`` print for one file, its verdict first."""
    lines = [ins.name, f"  verdict:    {verdict(ins)}"]
    if ins.refusal:
        return lines
    lengths = [len(s.input_ids) for s in ins.flat]
    turns, tokens = length_stats(turn_counts(ins.conversations)), length_stats(lengths)
    lines += [
        f"  format:     {ins.formats}",
        f"  records:    {len(ins.conversations)}",
        f"  turns:      min {turns['min']}, median {turns['median']}, max {turns['max']} (user + assistant)",
        "  tokens:     " + ", ".join(f"{k} {v}" for k, v in tokens.items()) + " (per sample, untruncated)",
        f"  truncated:  {truncated(ins)} of {len(lengths)} samples at data.max_seq_length={ins.max_length}",
    ]
    split, n_windows = split_documents(ins)
    if split:
        overlap = ins.cfg.window_overlap
        lines.append(
            f"  windows:    {split} document{'s' if split != 1 else ''} over {ins.max_length} tokens → "
            f"{n_windows} windows (overlap {overlap})"
        )
    lines.append(f"  trained:    {trained(ins)} tokens")
    found = problems(ins)
    lines += [f"  problem:    {p}" for p in found] or ["  problems:   none"]
    return lines


def stop_line(found: list[Inspection]) -> str | None:
    """Why training on these files would stop, as the error ``check`` ends with; None if it would not."""
    refused = [ins for ins in found if ins.refusal]
    if refused:
        return (
            refused[0].refusal
            if len(refused) == 1
            else f"{len(refused)} files are refused: {refused[0].refusal}"
        )
    for ins in found:
        if ins.skipped.count and ins.cfg.on_error == "raise":
            where, reason = ins.skipped.items[0]
            return f"{where}: {reason}; data.on_error=skip leaves such records out"
    if not any(trained(ins) for ins in found):
        cfg = found[0].cfg
        return f"{', '.join(cfg.path)}: no sample has trained tokens left within data.max_seq_length={cfg.max_seq_length}; raise it"
    return None
