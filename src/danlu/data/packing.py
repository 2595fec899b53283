"""Packing: many short samples into full rows, without letting them see each other.

A packed row concatenates samples and carries ``position_ids`` that restart at 0 for each
one. The row is fed to the model with ``attention_mask=None``; transformers then derives a
block-diagonal causal mask from the restarting positions (``find_packed_sequence_indices``
in ``transformers.masking_utils``), so a token attends only to earlier tokens of its own
sample, and rotary positions are those of the sample alone. The first token of every sample
gets no label: in a packed row it would otherwise be predicted from the previous sample.
The loss of a packed batch therefore equals the loss of the same samples unpacked.
"""

from __future__ import annotations

import numpy as np

from danlu.data.render import IGNORE, Sample


def pack(samples: list[Sample], max_length: int) -> list[Sample]:
    """Best-fit-decreasing bin packing of ``samples`` into rows of at most ``max_length`` tokens."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids), reverse=True)
    # bins_by_room[r] lists the rows that have exactly r tokens of room left
    bins_by_room: list[list[int]] = [[] for _ in range(max_length + 1)]
    rows: list[list[int]] = []
    for i in order:
        need = len(samples[i].input_ids)
        room = next((r for r in range(need, max_length + 1) if bins_by_room[r]), None)
        if room is None:
            rows.append([i])
            bins_by_room[max_length - need].append(len(rows) - 1)
            continue
        row = bins_by_room[room].pop()
        rows[row].append(i)
        bins_by_room[room - need].append(row)
    return [_concat([samples[i] for i in row]) for row in rows]


def _concat(parts: list[Sample]) -> Sample:
    ids = np.concatenate([np.asarray(s.input_ids, np.int32) for s in parts])
    labels = np.concatenate([np.asarray(s.labels, np.int32) for s in parts])
    starts = np.cumsum([0] + [len(s.input_ids) for s in parts[:-1]])
    labels[starts] = IGNORE
    positions = np.concatenate([np.arange(len(s.input_ids), dtype=np.int32) for s in parts])
    return Sample(ids, labels, any(s.truncated for s in parts), positions)
