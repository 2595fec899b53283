"""Messages → ``(input_ids, labels)`` through the tokenizer's chat template.

This is the only place where loss masks are made. Raw records (roles ``text``, or ``prompt``
then ``completion``) skip the template: text trains every token, a completion trains only
itself; both end with the EOS token. Each assistant turn is located in the
rendered text as the characters between "the conversation so far, with the generation
prompt" and "the conversation including this turn"; tokens starting inside those spans are
trained, everything else gets label ``IGNORE``. The span therefore holds the turn's end-of-turn
token (``<|im_end|>`` for ChatML), which the model must learn to stop; :func:`render` checks
that it is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from danlu.errors import UserError

IGNORE = -100


RAW_ROLES = ("text", "prompt", "completion")
LOSS_ON = ("assistant", "last_assistant", "all")


@dataclass
class Sample:
    """One tokenized training sample; packed rows carry positions that restart per sample."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    position_ids: list[int] | None = None

    @property
    def trained_tokens(self) -> int:
        return int((np.asarray(self.labels) != IGNORE).sum())


def _template(
    tokenizer: Any, messages: list[dict], generation_prompt: bool, tools: list | None = None
) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, tools=tools
    )


def assistant_spans(
    tokenizer: Any, messages: list[dict], tools: list | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return the text plus the character span of each assistant turn."""
    _check_template(tokenizer)
    text = _template(tokenizer, messages, False, tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], True, tools)
        # the conversation through its last turn is the whole text: one render saved per record
        through = text if i == len(messages) - 1 else _template(tokenizer, messages[: i + 1], False, tools)
        spans.append(_span(text, before, through))
    return text, spans


def assistant_spans_many(
    tokenizer: Any, conversations: list[list[dict]]
) -> list[tuple[str, list[tuple[int, int]]]]:
    """:func:`assistant_spans` for many conversations without tools, the template rendered in a
    few batched calls (a quarter less time than one call per render). On any error, call
    :func:`assistant_spans` per conversation to find the one at fault."""
    _check_template(tokenizer)
    texts = _render_many(tokenizer, conversations, False)
    turns = [
        (k, i) for k, msgs in enumerate(conversations) for i, m in enumerate(msgs) if m["role"] == "assistant"
    ]
    befores = _render_many(tokenizer, [conversations[k][:i] for k, i in turns], True)
    inner = [(k, i) for k, i in turns if i != len(conversations[k]) - 1]  # turns before the last
    rendered = _render_many(tokenizer, [conversations[k][: i + 1] for k, i in inner], False)
    throughs = dict(zip(inner, rendered, strict=True))
    out: list[tuple[str, list[tuple[int, int]]]] = [(text, []) for text in texts]
    for (k, i), before in zip(turns, befores, strict=True):
        out[k][1].append(_span(texts[k], before, throughs.get((k, i), texts[k])))
    return out


def _render_many(tokenizer: Any, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
    if not conversations:
        return []
    return tokenizer.apply_chat_template(
        conversations, tokenize=False, add_generation_prompt=generation_prompt
    )


def _check_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template; set data.template to a named template "
            "(chatml, llama3, alpaca, ...) or a .jinja file"
        )


def _span(text: str, before: str, through: str) -> tuple[int, int]:
    """An assistant turn's characters: after "the conversation so far + generation prompt",
    through "the conversation including this turn"; both must be prefixes of the whole text."""
    if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
        raise UserError(
            "the chat template does not render conversations as growing prefixes, so the "
            "assistant turns cannot be located; use a model whose template does"
        )
    return len(before), len(through)


def encode_texts(
    tokenizer: Any, texts: list[str], spans: list[list[tuple[int, int]]]
) -> list[tuple[np.ndarray, list[tuple[int, int]]]]:
    """Token ids of each text and, for each of its character spans, the range ``[first, last)``
    of the tokens that start inside the span; the tokenizer runs once for all texts."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: one call into Rust for the whole batch
        out = []
        for e, text_spans in zip(backend.encode_batch(texts, add_special_tokens=False), spans, strict=True):
            ranges = [_token_range(e, start, end) for start, end in text_spans]
            if any(r is None for r in ranges):  # a span edge no token covers: read every offset
                starts = np.asarray([a for a, _ in e.offsets], np.int64)
                ranges = [_range_from_starts(starts, start, end) for start, end in text_spans]
            out.append((np.asarray(e.ids, np.int32), ranges))
        return out
    out = []
    for text, text_spans in zip(texts, spans, strict=True):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.asarray([a for a, _ in enc["offset_mapping"]], np.int64)
        ranges = [_range_from_starts(starts, start, end) for start, end in text_spans]
        out.append((np.asarray(enc["input_ids"], np.int32), ranges))
    return out


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


def label(
    tokenizer: Any,
    ids: np.ndarray,
    ranges: list[tuple[int, int]],
    max_length: int,
    stop_ids: set[int],
    loss_on: str = "assistant",
) -> Sample:
    """Labels for encoded text: tokens in the trained ranges (see :func:`encode_texts`) keep their id."""
    trained = ranges[-1:] if loss_on == "last_assistant" else ranges
    labels = ids.copy() if loss_on == "all" else np.full_like(ids, IGNORE)
    for first, last in trained:
        turn = ids[first:last]
        if stop_ids and not any((turn == s).any() for s in stop_ids):
            names = ", ".join(repr(tokenizer.convert_ids_to_tokens(int(t))) for t in sorted(stop_ids))
            raise UserError(
                f"the chat template does not end assistant turns with a stop token ({names}), so the "
                "tuned model would never stop; use a template that closes each turn with the EOS token "
                "(data.template)"
            )
        labels[first:last] = turn
    truncated = len(ids) > max_length
    ids_np, labels_np = np.asarray(ids, np.int32), np.asarray(labels, np.int32)
    return Sample(ids_np[:max_length], labels_np[:max_length], truncated)


def render(
    tokenizer: Any,
    messages: list[dict],
    max_length: int,
    stop_ids: set[int],
    loss_on: str = "assistant",
    tools: list | None = None,
) -> Sample:
    """Tokenize one conversation; by default train on assistant turns, including their stop token.

    ``loss_on``: ``assistant`` (every assistant turn), ``last_assistant`` or ``all`` (every
    token). Raises :class:`UserError` when a trained assistant turn would not teach the model
    to stop (none of ``stop_ids`` inside it), since such a model never stops talking. For many
    conversations at once, :func:`assistant_spans`, :func:`encode_texts` and :func:`label` are
    the same steps with the tokenizer called once per batch.
    """
    if messages and messages[0]["role"] in RAW_ROLES:
        return render_raw(tokenizer, messages, max_length)
    text, spans = assistant_spans(tokenizer, messages, tools)
    ((ids, ranges),) = encode_texts(tokenizer, [text], [spans])
    return label(tokenizer, ids, ranges, max_length, stop_ids, loss_on)


def render_raw(tokenizer: Any, messages: list[dict], max_length: int) -> Sample:
    """``text``: every token trained; ``prompt`` + ``completion``: only the completion. Both end in EOS."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if messages[0]["role"] == "text":
        ids = tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"] + eos
        labels = list(ids)
    else:
        prompt = tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    truncated = len(ids) > max_length
    ids_np, labels_np = np.asarray(ids, np.int32), np.asarray(labels, np.int32)
    return Sample(ids_np[:max_length], labels_np[:max_length], truncated)
