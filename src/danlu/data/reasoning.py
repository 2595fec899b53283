"""Reasoning in assistant replies: ``reasoning_content`` or a ``<think>...</think>`` block.

Reasoning models' templates (Qwen3 and the like) read a reply's ``reasoning_content``, or
split a ``<think>`` block off its content, and render it their own way. ``data.reasoning``
keeps it (rendered as the template does) or strips it (the model learns the answers only).
A template that never reads ``reasoning_content`` would drop it without a word, so for such a
template the reasoning is written into the content as a ``<think>`` block, which every
template renders as text.
"""

from __future__ import annotations

import re

_THINK = re.compile(r"<think>.*?</think>\s*", re.S)
KEY = "reasoning_content"


def normalise(message: dict) -> dict:
    """``reasoning`` (as some exports name it) read as ``reasoning_content``."""
    if message.get("role") == "assistant" and "reasoning" in message and KEY not in message:
        message = {k: v for k, v in message.items() if k != "reasoning"}
        message[KEY] = message.pop("reasoning", None) or ""
    return message


def has_reasoning(messages: list[dict]) -> bool:
    return any(m["role"] == "assistant" and (m.get(KEY) or "<think>" in m["content"]) for m in messages)


def strip(messages: list[dict]) -> list[dict]:
    """Assistant replies without their reasoning: no ``reasoning_content``, no ``<think>`` block."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and (KEY in m or "<think>" in m["content"]):
            m = {k: v for k, v in m.items() if k != KEY}
            m["content"] = _THINK.sub("", m["content"]).lstrip()
        out.append(m)
    return out


def for_template(template: str | None, messages: list[dict]) -> list[dict]:
    """``messages`` as ``template`` can render them: ``reasoning_content`` moved into the
    content as a ``<think>`` block where the template does not read that field."""
    if KEY in (template or "") or not any(m.get(KEY) for m in messages):
        return messages
    out = []
    for m in messages:
        if m.get(KEY):
            thought = str(m[KEY]).strip("\n")
            m = {k: v for k, v in m.items() if k != KEY}
            m["content"] = f"<think>\n{thought}\n</think>\n\n{m['content']}"
        out.append(m)
    return out
