"""Messages → ``(input_ids, labels)`` through the tokenizer's chat template.

This is the only place where loss masks are made. Each assistant turn is located in the
rendered text as the characters between "the conversation so far, with the generation
prompt" and "the conversation including this turn"; tokens starting inside those spans are
trained, everything else gets label ``IGNORE``. The span therefore holds the turn's end-of-turn
token (``<|im_end|>`` for ChatML), which the model must learn to stop; :func:`render` checks
that it is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from danlu.errors import UserError

IGNORE = -100


@dataclass
class Sample:
    """One tokenized training sample."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _template(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return the text plus the character span of each assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template; use an instruct/chat model "
            "(named templates for base models come with a later release)"
        )
    text = _template(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], generation_prompt=True)
        through = _template(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise UserError(
                "the chat template does not render conversations as growing prefixes, so the "
                "assistant turns cannot be located; use a model whose template does"
            )
        spans.append((len(before), len(through)))
    return text, spans


def render(tokenizer: Any, messages: list[dict], max_length: int, stop_ids: set[int]) -> Sample:
    """Tokenize one conversation; train on assistant turns, including their stop token.

    Raises :class:`UserError` when an assistant turn would not teach the model to stop
    (none of ``stop_ids`` inside the trained span), since such a model never stops talking.
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        trained = [i for i, (a, _) in enumerate(enc["offset_mapping"]) if start <= a < end]
        if stop_ids and not any(ids[i] in stop_ids for i in trained):
            names = ", ".join(repr(tokenizer.convert_ids_to_tokens(t)) for t in sorted(stop_ids))
            raise UserError(
                f"the chat template does not end assistant turns with a stop token ({names}), so the "
                "tuned model would never stop; use a template that closes each turn with the EOS token"
            )
        for i in trained:
            labels[i] = ids[i]
    truncated = len(ids) > max_length
    return Sample(ids[:max_length], labels[:max_length], truncated)
