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
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template; set data.template to a named template "
            "(chatml, llama3, alpaca, ...) or a .jinja file"
        )
    text = _template(tokenizer, messages, False, tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], True, tools)
        # the conversation through its last turn is the whole text: one render saved per record
        through = text if i == len(messages) - 1 else _template(tokenizer, messages[: i + 1], False, tools)
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise UserError(
                "the chat template does not render conversations as growing prefixes, so the "
                "assistant turns cannot be located; use a model whose template does"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode_texts(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and each token's first character offset, for many texts in one call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: one call into Rust for the whole batch
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [
            (np.asarray(e.ids, np.int32), np.asarray([a for a, _ in e.offsets], np.int64)) for e in encodings
        ]
    out = []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        out.append(
            (np.asarray(enc["input_ids"], np.int32), np.asarray([a for a, _ in enc["offset_mapping"]]))
        )
    return out


def label(
    tokenizer: Any,
    ids: np.ndarray,
    starts: np.ndarray,
    spans: list[tuple[int, int]],
    max_length: int,
    stop_ids: set[int],
    loss_on: str = "assistant",
) -> Sample:
    """Labels for encoded text: tokens that start inside a trained span keep their id."""
    trained_spans = spans[-1:] if loss_on == "last_assistant" else spans
    labels = ids.copy() if loss_on == "all" else np.full_like(ids, IGNORE)
    stops = np.asarray(sorted(stop_ids), np.int32)
    for start, end in trained_spans:
        inside = (starts >= start) & (starts < end)
        if len(stops) and not np.isin(ids[inside], stops).any():
            names = ", ".join(repr(tokenizer.convert_ids_to_tokens(int(t))) for t in stops)
            raise UserError(
                f"the chat template does not end assistant turns with a stop token ({names}), so the "
                "tuned model would never stop; use a template that closes each turn with the EOS token "
                "(data.template)"
            )
        labels[inside] = ids[inside]
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
    ((ids, starts),) = encode_texts(tokenizer, [text])
    return label(tokenizer, ids, starts, spans, max_length, stop_ids, loss_on)


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
