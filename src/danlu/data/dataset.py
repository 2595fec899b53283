"""A data config → tokenized samples → padded batches.

Reads the file, detects or checks the format, fills placeholders, renders every record
through the chat template and reports what happened (:class:`DataSummary`). Knows nothing of
the model beyond its tokenizer.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from danlu.config import DataConfig
from danlu.data.formats import Message, Record, detect_format, fill_placeholders, read_records, to_messages
from danlu.data.render import IGNORE, Sample, render
from danlu.errors import UserError

log = logging.getLogger(__name__)
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


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

    def line(self) -> str:
        return (
            f"{self.path}: {self.records} {self.format} records → {self.samples} samples, "
            f"{self.tokens} tokens ({self.trained_tokens} trained), {self.truncated} truncated"
        )


def load_conversations(cfg: DataConfig) -> tuple[list[tuple[Record, list[Message]]], str]:
    """Read ``cfg.path`` and turn every record into messages; returns them and the format."""
    if not cfg.path:
        raise UserError("data.path is not set; give a .json/.jsonl file, e.g. data.path=train.jsonl")
    records = read_records(cfg.path)
    fmt = cfg.format if cfg.format != "auto" else detect_format(records[0])
    conversations = []
    unfilled: set[str] = set()
    for record in records:
        messages = fill_placeholders(to_messages(record, fmt), cfg.placeholders)
        if cfg.system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system}, *messages]
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{record.where()}: record has no assistant reply to train on")
        for m in messages:
            unfilled.update(_PLACEHOLDER.findall(m["content"]))
        conversations.append((record, messages))
    if unfilled:
        keys = ", ".join(sorted(unfilled))
        log.warning(
            "data still holds placeholders {{%s}}; set data.placeholders.KEY=VALUE to fill them", keys
        )
    return conversations, fmt


def build(cfg: DataConfig, tokenizer: Any, stop_ids: set[int]) -> tuple[list[Sample], DataSummary]:
    """Tokenize the whole data file; samples with nothing left to train on are dropped."""
    conversations, fmt = load_conversations(cfg)
    samples = []
    for record, messages in conversations:
        try:
            sample = render(tokenizer, messages, cfg.max_seq_length, stop_ids)
        except UserError as e:
            raise UserError(f"{record.where()}: {e}") from None
        if sample.trained_tokens:
            samples.append(sample)
    if not samples:
        raise UserError(
            f"{cfg.path}: no sample has assistant tokens left within data.max_seq_length="
            f"{cfg.max_seq_length}; raise it"
        )
    summary = DataSummary(
        path=str(cfg.path),
        format=fmt,
        records=len(conversations),
        samples=len(samples),
        truncated=sum(s.truncated for s in samples),
        tokens=sum(len(s.input_ids) for s in samples),
        trained_tokens=sum(s.trained_tokens for s in samples),
    )
    return samples, summary


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order of ``n`` samples that depends only on (seed, epoch): resumable."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def micro_batches(
    samples: list[Sample], batch_size: int, seed: int, start_epoch: int = 0
) -> Iterator[list[Sample]]:
    """Endless micro-batches, epoch after epoch; the last partial batch of an epoch is kept."""
    epoch = start_epoch
    while True:
        order = epoch_order(len(samples), seed, epoch)
        for i in range(0, len(order), batch_size):
            yield [samples[j] for j in order[i : i + batch_size]]
        epoch += 1


def collate(batch: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked out of attention and loss."""
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, s in enumerate(batch):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
