"""Tool definitions and tool calls, as chat templates take them.

Datasets write tools several ways; chat templates (Qwen2.5/3, Llama 3.1, Mistral, Hermes, ...)
read one: ``tools`` as a list of ``{"type": "function", "function": {name, description,
parameters}}`` passed to ``apply_chat_template``, an assistant message's calls as
``tool_calls: [{"type": "function", "function": {"name": ..., "arguments": {...}}}]`` with the
arguments as a mapping (templates write them with ``tojson``; a JSON string would be quoted
twice), and results as ``tool`` messages. This module turns what datasets hold into that:
OpenAI's calls with arguments as JSON text, ShareGPT's bare schemas (``{"name": ..,
"parameters": ..}``) and ``function_call`` turns whose value is JSON text
``{"name": .., "arguments": ..}`` (or a list of them).

:func:`template_gap` says when a chat template has no place for tools or calls, so a record is
refused instead of being rendered without them.
"""

from __future__ import annotations

import json
from typing import Any

from danlu.errors import UserError


def tool_schemas(items: list, where: str, name: str = "tools") -> list[dict]:
    """Tool definitions as ``{"type": "function", "function": {...}}`` (bare schemas wrapped)."""
    out = []
    for i, tool in enumerate(items):
        if (
            isinstance(tool, dict)
            and tool.get("type") == "function"
            and isinstance(tool.get("function"), dict)
        ):
            out.append(tool)
        elif isinstance(tool, dict) and isinstance(tool.get("name"), str) and "type" not in tool:
            out.append({"type": "function", "function": tool})
        else:
            got = f"keys {sorted(tool)}" if isinstance(tool, dict) else type(tool).__name__
            raise UserError(
                f'{where}: {name}[{i}] must be a function schema, {{"type": "function", "function": '
                f'{{"name": ...}}}} or {{"name": ..., "parameters": ...}}; got {got}'
            )
    return out


def tool_calls(items: list, where: str, name: str) -> list[dict]:
    """Calls as ``{"type": "function", "function": {"name", "arguments": {...}}}`` (other keys,
    such as ``id``, kept); arguments given as JSON text are read into a mapping."""
    out = []
    for i, call in enumerate(items):
        here = f"{name}[{i}]"
        if not isinstance(call, dict):
            raise UserError(f"{where}: {here} must be an object, got {type(call).__name__}")
        if isinstance(call.get("function"), dict):
            body, rest = call["function"], {k: v for k, v in call.items() if k != "function"}
        else:  # a bare {"name": ..., "arguments": ...}
            body, rest = call, {}
        fn = body.get("name")
        if not isinstance(fn, str) or not fn:
            raise UserError(f"{where}: {here} has no function name (field 'name')")
        args = _arguments(body.get("arguments", body.get("parameters")), where, here)
        out.append({**rest, "type": "function", "function": {"name": fn, "arguments": args}})
    return out


def _arguments(value: Any, where: str, name: str) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{where}: {name}'s arguments are not valid JSON ({e.msg}): {value[:60]!r}"
            ) from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: {name}'s arguments must be an object, got {type(value).__name__}")
    return value


def function_call(value: str, where: str, name: str) -> list[dict]:
    """A ShareGPT ``function_call`` turn's value (JSON text: one call or a list) → tool calls."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise UserError(
            f'{where}: {name} must be JSON text {{"name": ..., "arguments": ...}} ({e.msg}): {value[:60]!r}'
        ) from None
    return tool_calls(parsed if isinstance(parsed, list) else [parsed], where, name)


def template_gap(template: str | None, messages: list[dict], tools: list | None) -> str | None:
    """Why ``template`` (Jinja source) cannot render these tools or calls, or None.

    A template that never mentions ``tools`` (or ``tool_calls``) drops them without a word:
    the model would learn to call tools it never sees, in a format not its own.
    """
    source = template or ""
    if tools and "tools" not in source:
        return (
            "the record defines tools but the chat template has no place for them (it never reads "
            "`tools`); use a model whose template supports tools (Qwen2.5, Qwen3, Llama 3.1, Mistral, "
            "...) or set data.template to a .jinja file that renders them"
        )
    if any(m.get("tool_calls") for m in messages) and "tool_calls" not in source:
        return (
            "the record has tool calls but the chat template has no place for them (it never reads "
            "`tool_calls`); use a model whose template supports tools or set data.template to a "
            ".jinja file that renders them"
        )
    return None
