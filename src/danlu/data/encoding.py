"""Rendered texts → token ids, and the token range of each trained character span.

Fast tokenizers give character offsets: the tokenizer runs once for a batch of texts and each
span's range is read from its two edges. Slow (Python) tokenizers give none: the text up to
each edge is tokenized again (see :func:`_encode_slow`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from danlu.errors import UserError


class RecordError(UserError):
    """A record the chat template or tokenizer cannot render right (the template raises on it);
    ``data.on_error=skip`` leaves it out, like any other bad record."""


def encode_texts(
    tokenizer: Any, texts: list[str], spans: list[list[tuple[int, int]]]
) -> list[tuple[np.ndarray, list[tuple[int, int]]]]:
    """Token ids of each text and, for each of its character spans, the range ``[first, last)``
    of the tokens that start inside the span; the tokenizer runs once for all texts.

    Slow (Python) tokenizers give no character offsets; see :func:`_encode_slow`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [
            _encode_slow(tokenizer, text, text_spans) for text, text_spans in zip(texts, spans, strict=True)
        ]
    out = []  # fast tokenizers: one call into Rust for the whole batch
    for e, text_spans in zip(backend.encode_batch(texts, add_special_tokens=False), spans, strict=True):
        ranges = [_token_range(e, start, end) for start, end in text_spans]
        if any(r is None for r in ranges):  # a span edge no token covers: read every offset
            starts = np.asarray([a for a, _ in e.offsets], np.int64)
            ranges = [_range_from_starts(starts, start, end) for start, end in text_spans]
        out.append((np.asarray(e.ids, np.int32), ranges))
    return out


def _encode_slow(
    tokenizer: Any, text: str, spans: list[tuple[int, int]]
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A slow tokenizer's ids for ``text`` and the token ranges of ``spans``, without offsets.

    The text up to each span edge is tokenized on its own; where those ids begin the ids of the
    whole text, the edge falls between two tokens, at that count. Otherwise a token crosses
    the edge, and which tokens are the turn's cannot be told: the record is refused rather
    than trained on a guess. Costs one tokenizer call per span edge.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    edges: dict[int, int] = {0: 0, len(text): len(ids)}
    for edge in sorted({e for span in spans for e in span} - set(edges)):
        head = list(tokenizer(text[:edge], add_special_tokens=False)["input_ids"])
        if ids[: len(head)] != head:
            raise RecordError(
                f"{type(tokenizer).__name__} is a slow (Python) tokenizer, and one of its tokens here "
                f"crosses the edge of an assistant turn ({text[max(0, edge - 12) : edge + 12]!r}), so "
                "the turn's tokens cannot be told; use the model's fast tokenizer (tokenizer.json)"
            )
        edges[edge] = len(head)
    return np.asarray(ids, np.int32), [(edges[start], edges[end]) for start, end in spans]


def _range_from_starts(starts: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """Tokens whose first character lies in ``[start, end)`` (token starts never decrease)."""
    return int(np.searchsorted(starts, start, "left")), int(np.searchsorted(starts, end, "left"))


def _token_range(encoding: Any, start: int, end: int) -> tuple[int, int] | None:
    """:func:`_range_from_starts` asking the encoding about the two edges only, instead of
    turning every offset into Python objects. Byte-level tokenizers may split one character
    into several tokens that share its offsets, hence the steps to the neighbours."""
    first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
    if first is None or last is None:
        return None
    begin = lambda i: encoding.token_to_chars(i)[0]  # noqa: E731
    n = len(encoding.ids)
    if begin(first) < start:  # the token straddles the edge: it started before the span
        first += 1
    while first > 0 and begin(first - 1) >= start:
        first -= 1
    while last + 1 < n and begin(last + 1) < end:
        last += 1
    return first, last + 1
