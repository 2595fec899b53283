"""Messages → ``(input_ids, labels)`` through the tokenizer's chat template.

This is the only place where loss masks are made. Raw records (roles ``text``, or ``prompt``
then ``completion``) skip the template: text trains every token, a completion trains only
itself; both end with the EOS token.

An assistant turn is trained as the template renders it at that point of the conversation,
which is what the model sees when it writes that turn: the characters between "the
conversation so far, with the generation prompt" (``before``) and "the conversation through
this turn" (``through``). The span therefore holds the turn's end-of-turn token (``<|im_end|>``
for ChatML), which the model must learn to stop; :func:`label` checks that it is there.

Most templates render conversations as growing prefixes: every turn's ``before`` and
``through`` are prefixes of the whole conversation, and the conversation is one sample with
each turn's span trained. Reasoning templates do not. Qwen3's drops the ``<think>`` part of
replies that came before the last user message, so an earlier reply reads differently in the
whole conversation than when it was written; Gemma 4's generation prompt holds an empty thought
channel that no rendered reply has. Such a turn becomes a sample of its own: ``before`` and the
reply as ``through`` renders it (what ``through`` adds to ``before``, or, when ``before`` is not
a prefix of ``through``, what follows their common start, if that begins with the turn's
content), only the reply trained. The whole conversation still trains every turn it renders
as written. A chat of n replies then costs up to n samples and about n/2 times the tokens.
With ``loss_on=all`` the whole conversation is trained as rendered and is always one sample.

A chat template that raises on a record (Mistral's "roles must alternate" on a system message)
is a :class:`RecordError`: one bad record, skipped under ``data.on_error=skip``; so is a record
with tools or tool calls for a template that has no place for them (:mod:`danlu.data.tools`).
Reasoning (``reasoning_content``) goes to templates that read it and into the content as a
``<think>`` block for those that do not (:mod:`danlu.data.reasoning`). ``template_kwargs``
(``data.template_kwargs``, e.g. ``enable_thinking``) reach every render of the template.

An assistant message with ``train: false`` (a loss weight of 0) is rendered but not trained.
A ``text`` document longer than ``max_length`` becomes windows (:func:`render_raw`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from danlu.data import reasoning
from danlu.data.encoding import RecordError, encode_texts
from danlu.data.tools import template_gap
from danlu.errors import UserError

IGNORE = -100


RAW_ROLES = ("text", "prompt", "completion")
LOSS_ON = ("assistant", "last_assistant", "all")

# A rendered text and the character spans it trains: (text, [(start, end), ...])
Rendering = tuple[str, list[tuple[int, int]]]


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
    tokenizer: Any,
    messages: list[dict],
    generation_prompt: bool,
    tools: list | None = None,
    kwargs: dict | None = None,
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, tools=tools, **(kwargs or {})
        )
    except Exception as e:  # noqa: BLE001 - the template is the user's code: what it raises is about the data
        raise _refusal(tokenizer, messages, tools, e, kwargs) from None


def _refusal(
    tokenizer: Any, messages: list[dict], tools: list | None, error: Exception, kwargs: dict | None = None
) -> UserError:
    """The error for a template that raised on ``messages``: its own message and what to do."""
    from jinja2 import TemplateError, TemplateSyntaxError

    if isinstance(error, TemplateSyntaxError):  # the template itself is broken, not the record
        return UserError(
            f"the chat template is not valid Jinja (line {error.lineno}: {error.message}); "
            "fix it or set data.template to a named template"
        )
    said = str(error).strip()
    if type(error) is not TemplateError:  # raise_exception() gives the template's own words
        said = f"{type(error).__name__}: {said}" if said else type(error).__name__
    fix = "fix the record, or set data.template to a template that takes it"
    if any(m["role"] == "system" for m in messages):
        rest = [m for m in messages if m["role"] != "system"]
        try:
            tokenizer.apply_chat_template(rest, tokenize=False, tools=tools, **(kwargs or {}))
        except Exception:  # noqa: BLE001, S110 - it fails without the system message too
            pass
        else:
            fix = (
                "this template takes no system message: drop it from the record (and data.system), "
                "or set data.template to a template that has one"
            )
    return RecordError(f"the chat template refuses this record ({said}); {fix}")


def _render_many(
    tokenizer: Any, conversations: list[list[dict]], generation_prompt: bool, kwargs: dict | None = None
) -> list[str]:
    if not conversations:
        return []
    return tokenizer.apply_chat_template(
        conversations, tokenize=False, add_generation_prompt=generation_prompt, **(kwargs or {})
    )


def _wanted(messages: list[dict], loss_on: str) -> list[int]:
    """Indices of the assistant turns to locate: the trained ones, never those marked
    ``train: false`` (for ``all``: every one, so each is checked for its stop token)."""
    if loss_on == "all":
        return [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
    return turns[-1:] if loss_on == "last_assistant" else turns


def _fit(tokenizer: Any, messages: list[dict], tools: list | None) -> list[dict]:
    """``messages`` as the template can take them: reasoning where it reads it; tools or tool
    calls it has no place for refused (:class:`RecordError`)."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    gap = template_gap(template, messages, tools)
    if gap:
        raise RecordError(gap)
    return reasoning.for_template(template, messages)


def assistant_spans(
    tokenizer: Any,
    messages: list[dict],
    tools: list | None = None,
    loss_on: str = "assistant",
    template_kwargs: dict | None = None,
) -> list[Rendering]:
    """The texts ``messages`` trains as, each with the character spans of its trained turns:
    the whole conversation first, then one text per turn it does not render as written.
    ``template_kwargs`` go to every ``apply_chat_template`` call (``enable_thinking``, ...)."""
    _check_template(tokenizer)
    messages = _fit(tokenizer, messages, tools)
    kw = template_kwargs
    text = _template(tokenizer, messages, False, tools, kw)
    wanted = _wanted(messages, loss_on)
    turns = [
        (
            _template(tokenizer, messages[:i], True, tools, kw),
            text if i == len(messages) - 1 else _template(tokenizer, messages[: i + 1], False, tools, kw),
            messages[i]["content"],
        )
        for i in wanted
    ]
    return _renderings(text, turns, loss_on)


def assistant_spans_many(
    tokenizer: Any,
    conversations: list[list[dict]],
    loss_on: str = "assistant",
    template_kwargs: dict | None = None,
) -> list[list[Rendering]]:
    """:func:`assistant_spans` for many conversations without tools, the template rendered in a
    few batched calls (a quarter less time than one call per render). On any error, call
    :func:`assistant_spans` per conversation to find the one at fault."""
    _check_template(tokenizer)
    conversations = [_fit(tokenizer, msgs, None) for msgs in conversations]
    kw = template_kwargs
    texts = _render_many(tokenizer, conversations, False, kw)
    wanted = [(k, i) for k, msgs in enumerate(conversations) for i in _wanted(msgs, loss_on)]
    befores = _render_many(tokenizer, [conversations[k][:i] for k, i in wanted], True, kw)
    inner = [(k, i) for k, i in wanted if i != len(conversations[k]) - 1]  # not the last message
    rendered = _render_many(tokenizer, [conversations[k][: i + 1] for k, i in inner], False, kw)
    throughs = dict(zip(inner, rendered, strict=True))
    turns: list[list[tuple[str, str, str]]] = [[] for _ in conversations]
    for (k, i), before in zip(wanted, befores, strict=True):
        turns[k].append((before, throughs.get((k, i), texts[k]), conversations[k][i]["content"]))
    return [_renderings(text, t, loss_on) for text, t in zip(texts, turns, strict=True)]


def _check_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template; set data.template to a named template "
            "(chatml, llama3, alpaca, ...) or a .jinja file"
        )


def _renderings(text: str, turns: list[tuple[str, str, str]], loss_on: str) -> list[Rendering]:
    """Place each turn, given as its ``before`` and ``through`` renders and its content: in the
    whole ``text`` when both are prefixes of it, else in a text of its own. See the module
    docstring."""
    whole: list[tuple[int, int]] = []
    apart: list[Rendering] = []
    for k, (before, through, content) in enumerate(turns):
        last = k == len(turns) - 1
        if len(through) > len(before) and text.startswith(through) and text.startswith(before):
            whole.append((len(before), len(through)))
            continue
        reply = _reply(before, through, content)
        if loss_on == "all":  # the whole text is trained as rendered; its last reply must be found
            if not last:
                continue
            if reply is not None and text.startswith(through):
                whole.append((len(through) - len(reply), len(through)))
                continue
        elif reply is not None:
            apart.append((before + reply, [(len(before), len(before) + len(reply))]))
            continue
        raise UserError(
            "the chat template renders an assistant turn's prompt (the conversation before it, with "
            "the generation prompt) so that the turn cannot be located after it; use a model or "
            "data.template whose template does"
        )
    return ([(text, whole)] if whole or not apart else []) + apart


def _reply(before: str, through: str, content: str) -> str | None:
    """The text the model writes for a turn, after the prompt ``before``: what ``through`` adds
    to it; or, where the generation prompt holds something the rendered turn lacks (Gemma 4's
    empty thought channel), what ``through`` has after their common start, if that is the turn's
    content. None when neither holds."""
    if len(through) > len(before) and through.startswith(before):
        return through[len(before) :]
    reply = through[len(os.path.commonprefix([before, through])) :]
    head = content.strip()[:32]
    return reply if head and reply.lstrip().startswith(head) else None


def label(
    tokenizer: Any,
    ids: np.ndarray,
    ranges: list[tuple[int, int]],
    max_length: int,
    stop_ids: set[int],
    loss_on: str = "assistant",
) -> Sample:
    """Labels for encoded text: tokens in ``ranges`` (see :func:`encode_texts`) keep their id,
    or every token with ``loss_on="all"``. Each range must hold one of ``stop_ids``."""
    labels = ids.copy() if loss_on == "all" else np.full_like(ids, IGNORE)
    for first, last in ranges:
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


def render_samples(
    tokenizer: Any,
    messages: list[dict],
    max_length: int,
    stop_ids: set[int],
    loss_on: str = "assistant",
    tools: list | None = None,
    template_kwargs: dict | None = None,
) -> list[Sample]:
    """Tokenize one conversation into the samples it trains as (see the module docstring).

    ``loss_on``: ``assistant`` (every assistant turn), ``last_assistant`` or ``all`` (every
    token). Raises :class:`UserError` when a trained assistant turn would not teach the model
    to stop (none of ``stop_ids`` inside it), since such a model never stops talking. For many
    conversations at once, :func:`assistant_spans_many`, :func:`encode_texts` and
    :func:`label` are the same steps with the tokenizer called once per batch.
    """
    if messages and messages[0]["role"] in RAW_ROLES:
        return render_raw(tokenizer, messages, max_length)
    renderings = assistant_spans(tokenizer, messages, tools, loss_on, template_kwargs)
    encoded = encode_texts(tokenizer, [t for t, _ in renderings], [s for _, s in renderings])
    return [label(tokenizer, ids, ranges, max_length, stop_ids, loss_on) for ids, ranges in encoded]


def render(
    tokenizer: Any,
    messages: list[dict],
    max_length: int,
    stop_ids: set[int],
    loss_on: str = "assistant",
    tools: list | None = None,
    template_kwargs: dict | None = None,
) -> Sample:
    """:func:`render_samples` for a conversation that trains as one sample (raises otherwise)."""
    samples = render_samples(tokenizer, messages, max_length, stop_ids, loss_on, tools, template_kwargs)
    if len(samples) != 1:
        raise ValueError(f"this conversation trains as {len(samples)} samples; use render_samples")
    return samples[0]


def render_raw(
    tokenizer: Any, messages: list[dict], max_length: int, overlap: int | None = None
) -> list[Sample]:
    """``text``: every token trained; ``prompt`` + ``completion``: only the completion. Both end in EOS.

    Longer than ``max_length``, a completion is truncated, and so is a text when ``overlap`` is
    None; else the text becomes windows (see :func:`windows`), each a sample of its own.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if messages[0]["role"] == "text":
        ids = tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"] + eos
        labels = list(ids)
        if overlap is not None and len(ids) > max_length:
            ids_np = np.asarray(ids, np.int32)
            out = []
            for start, end, context in windows(len(ids), max_length, overlap):
                piece = ids_np[start:end]
                marked = piece.copy()
                marked[:context] = IGNORE  # the overlap is context here, trained in the window before
                out.append(Sample(piece, marked))
            return out
    else:
        prompt = tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    truncated = len(ids) > max_length
    ids_np, labels_np = np.asarray(ids, np.int32), np.asarray(labels, np.int32)
    return [Sample(ids_np[:max_length], labels_np[:max_length], truncated)]


def windows(length: int, max_length: int, overlap: int) -> list[tuple[int, int, int]]:
    """A document of ``length`` tokens as windows of at most ``max_length``: ``(start, end,
    context)``, where each window after the first starts ``overlap`` tokens before the end of
    the one before and those ``context`` tokens are not trained again."""
    if not 0 <= overlap < max_length:
        raise UserError(
            f"data.window_overlap={overlap} must be at least 0 and less than data.max_seq_length={max_length}"
        )
    out, start = [(0, min(length, max_length), 0)], min(length, max_length)
    while start < length:
        begin = start - overlap
        end = min(length, begin + max_length)
        out.append((begin, end, overlap))
        start = end
    return out
