"""Records as users bring them → lists of chat messages.

Pure functions, no tokenizer and no files (``sources`` reads those): each ``Record`` becomes
``[{"role": ..., "content": ...}, ...]``. Every problem is a :class:`UserError` naming file,
line and field (and the user's own column name when ``data.columns`` renamed it).

Formats read here:
- ``alpaca``: ``instruction``, ``input``, ``output``, optional ``system`` and ``history``
  (a list of ``[question, answer]`` pairs before this one).
- ``messages`` (OpenAI): ``{"messages": [{"role": ..., "content": ...}, ...]}``, optional
  record-level ``tools`` (see :func:`record_tools`); assistant messages may carry ``tool_calls``.
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``.
- ``conversation`` (Firefly/MOSS): ``{"conversation": [{"human": ..., "assistant": ...}]}``
  with optional ``system``.
- ``text``: ``{"text": ...}`` → one ``text`` message; every token is trained (plain pretraining).
- ``completion``: ``{"prompt": ..., "completion": ...}`` → ``prompt`` and ``completion``
  messages; only the completion is trained.

List fields (``messages``, ``history``, ``tools``, ...) may also arrive as JSON text, as they
do from CSV files and some Parquet exports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from danlu.errors import UserError

FORMATS = ("alpaca", "messages", "sharegpt", "conversation", "text", "completion")
Message = dict[str, Any]


@dataclass
class Record:
    """One raw record, where it came from, and how it was read."""

    data: Any
    path: str
    line: int
    columns: dict[str, str] = field(default_factory=dict)  # our field → the user's column
    format: str | None = None  # set by sources.load_sources once known

    def where(self) -> str:
        if self.path.endswith(".parquet"):  # a Parquet file has rows, not lines
            return f"{self.path} row {self.line}"
        return f"{self.path}:{self.line}"


def apply_columns(record: Record, columns: dict[str, str]) -> Record:
    """Rename the user's top-level columns to ours (``columns`` maps ours → theirs).

    The user's names disappear, so ``{"prompt": "input", "completion": "output"}`` does not
    leave an ``output`` key behind that would read as alpaca. A record that already uses our
    name keeps it (handy when one mapping covers several files). Errors later name both.
    """
    if not columns or not isinstance(record.data, dict):
        return record
    theirs = set(columns.values())
    data = {k: v for k, v in record.data.items() if k not in theirs}
    for ours, column in columns.items():
        if column in record.data:
            data[ours] = record.data[column]
    return Record(data, record.path, record.line, dict(columns), record.format)


def detect_format(record: Record) -> str:
    """Name the format of one record from its keys."""
    d = record.data
    if not isinstance(d, dict):
        raise UserError(f"{record.where()}: a record must be a JSON object, got {type(d).__name__}")
    if "messages" in d:
        return "messages"
    if "conversations" in d:
        return "sharegpt"
    if "conversation" in d:
        return "conversation"
    if "instruction" in d or "output" in d:
        return "alpaca"
    if "prompt" in d and "completion" in d:
        return "completion"
    if "text" in d:
        return "text"
    raise UserError(
        f"{record.where()}: cannot tell the format from keys {sorted(d)}; expected one of: "
        "instruction/input/output (alpaca), messages, conversations (sharegpt), conversation "
        "(firefly), text, prompt/completion; rename columns with data.columns or set data.format"
    )


def to_messages(record: Record, fmt: str) -> list[Message]:
    """Convert one record of format ``fmt`` into chat messages."""
    if not isinstance(record.data, dict):
        raise UserError(f"{record.where()}: a record must be a JSON object, got {type(record.data).__name__}")
    return _CONVERTERS[fmt](record)


def record_tools(record: Record, fmt: str | None = None) -> list[dict] | None:
    """The record-level ``tools`` (function schemas) of a ``messages`` record, or None.

    ``fmt`` defaults to ``record.format``; other formats have no tools.
    """
    if (fmt or record.format) != "messages" or not isinstance(record.data, dict):
        return None
    tools = _list(record, record.data, "tools", required=False)
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise UserError(f"{record.where()}: tools[{i}] must be an object, got {type(tool).__name__}")
    return tools or None


def _field(record: Record, key: str) -> str:
    """``field 'output'``, plus the user's column name when data.columns renamed it."""
    column = record.columns.get(key)
    return f"field '{key}' (column '{column}')" if column and column != key else f"field '{key}'"


def _text(record: Record, obj: dict, key: str, *, required: bool = True, field_name: str = "") -> str:
    """``obj[key]`` as text; ``field_name`` names nested fields, top-level ones use their key."""
    name = f"field '{field_name}'" if field_name else _field(record, key)
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if required:
            raise UserError(f"{record.where()}: {name} is missing or empty")
        return ""
    if not isinstance(value, str):
        raise UserError(f"{record.where()}: {name} must be text, got {type(value).__name__}")
    return value


def _list(record: Record, obj: dict, key: str, *, required: bool = True, field_name: str = "") -> list:
    """``obj[key]`` as a list, decoding JSON text (CSV cells); required means non-empty."""
    name = f"field '{field_name}'" if field_name else _field(record, key)
    value = obj.get(key)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise UserError(f"{record.where()}: {name} holds malformed JSON ({e.msg})") from None
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise UserError(f"{record.where()}: {name} must be a {'non-empty ' if required else ''}list")
    return value


def _alpaca(record: Record) -> list[Message]:
    d = record.data
    messages: list[Message] = []
    system = _text(record, d, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = d.get("history") or []
    if isinstance(history, str) and history.strip().startswith("["):  # JSON text from a CSV cell
        history = _list(record, d, "history")
    if not isinstance(history, list):
        raise UserError(
            f"{record.where()}: {_field(record, 'history')} must be a list of [question, answer] pairs"
        )
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f"{record.where()}: history[{i}] must be a [question, answer] pair of texts")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(record, d, "instruction", required=False)
    extra = _text(record, d, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if instruction and extra else (instruction or extra)
    if not prompt.strip():
        raise UserError(f"{record.where()}: {_field(record, 'instruction')} is missing or empty")
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(record, d, "output")})
    return messages


_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "human": "user",
    "gpt": "assistant",
    "observation": "tool",
    "function_call": "assistant",
}


def _messages(record: Record) -> list[Message]:
    items = _list(record, record.data, "messages")
    record_tools(record, "messages")  # a malformed tools list is this record's error, found now
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise UserError(f"{record.where()}: messages[{i}].role must be system, user, assistant or tool")
        role = _ROLES[m["role"]]
        calls = _list(record, m, "tool_calls", required=False, field_name=f"messages[{i}].tool_calls")
        # an assistant turn that only calls tools has no text
        required = role == "assistant" and not calls
        content = _text(record, m, "content", required=required, field_name=f"messages[{i}].content")
        # Parquet fills absent struct fields with None; drop them so templates see them as absent
        message = {k: v for k, v in m.items() if v is not None}
        message.update(role=role, content=content)
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


def _sharegpt(record: Record) -> list[Message]:
    items = _list(record, record.data, "conversations")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("from") not in _ROLES:
            raise UserError(
                f"{record.where()}: conversations[{i}].from must be system, human, gpt, "
                "function_call or observation"
            )
        value = _text(record, m, "value", field_name=f"conversations[{i}].value")
        out.append({"role": _ROLES[m["from"]], "content": value})
    return out


def _conversation(record: Record) -> list[Message]:
    d = record.data
    turns = _list(record, d, "conversation")
    out: list[Message] = []
    system = _text(record, d, "system", required=False)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{record.where()}: conversation[{i}] must be an object")
        system = system or _text(
            record, turn, "system", required=False, field_name=f"conversation[{i}].system"
        )
        # Firefly pairs human/assistant, XTuner input/output: name the missing one of the pair in use
        user_key = "human" if "human" in turn or ("input" not in turn and "assistant" in turn) else "input"
        bot_key = (
            "assistant" if "assistant" in turn or ("output" not in turn and user_key == "human") else "output"
        )
        out.append(
            {
                "role": "user",
                "content": _text(record, turn, user_key, field_name=f"conversation[{i}].{user_key}"),
            }
        )
        out.append(
            {
                "role": "assistant",
                "content": _text(record, turn, bot_key, field_name=f"conversation[{i}].{bot_key}"),
            }
        )
    return ([{"role": "system", "content": system}] if system else []) + out


def _plain_text(record: Record) -> list[Message]:
    return [{"role": "text", "content": _text(record, record.data, "text")}]


def _completion(record: Record) -> list[Message]:
    d = record.data
    if d.get("prompt") is None:  # an empty prompt is fine, an absent one is a wrong column
        raise UserError(f"{record.where()}: {_field(record, 'prompt')} is missing")
    prompt = _text(record, d, "prompt", required=False)
    return [
        {"role": "prompt", "content": prompt},
        {"role": "completion", "content": _text(record, d, "completion")},
    ]


_CONVERTERS = {
    "alpaca": _alpaca,
    "messages": _messages,
    "sharegpt": _sharegpt,
    "conversation": _conversation,
    "text": _plain_text,
    "completion": _completion,
}


def fill_placeholders(messages: list[Message], values: dict[str, str]) -> list[Message]:
    """Replace ``{{key}}`` in every message's content with ``values[key]``."""
    if not values:
        return messages
    out = []
    for m in messages:
        content = m["content"]
        for key, value in values.items():
            content = content.replace("{{" + key + "}}", value)
        out.append({**m, "content": content})
    return out
