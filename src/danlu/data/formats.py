"""Records as users bring them → lists of chat messages.

Pure functions, no tokenizer: a file becomes ``Record``s (with the line each came from), and
each record becomes ``[{"role": ..., "content": ...}, ...]``. Every problem is a
:class:`UserError` naming file, line and field.

Formats read here:
- ``alpaca``: ``instruction``, ``input``, ``output``, optional ``system`` and ``history``
  (a list of ``[question, answer]`` pairs before this one).
- ``messages`` (OpenAI): ``{"messages": [{"role": ..., "content": ...}, ...]}``.
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``.
- ``conversation`` (Firefly/MOSS): ``{"conversation": [{"human": ..., "assistant": ...}]}``
  with optional ``system``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from danlu.errors import UserError

FORMATS = ("alpaca", "messages", "sharegpt", "conversation")
Message = dict[str, str]


@dataclass
class Record:
    """One raw record and where it came from."""

    data: Any
    path: str
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_records(path: str | Path) -> list[Record]:
    """Read a JSON array or JSON Lines file (whatever its extension says)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {p} (set data.path to a .json or .jsonl file)")
    if p.is_dir():
        raise UserError(f"data.path is a folder: {p}; point it at a .json or .jsonl file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{p}:{line}: not UTF-8 text; convert it, e.g. `iconv -f GBK -t UTF-8 {p.name} > fixed.json`"
        ) from None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise UserError(f"{p}: the file is empty; it needs at least one record")
    if text.lstrip().startswith("["):
        return _read_array(text, p)
    return _read_lines(text, p)


def _read_array(text: str, p: Path) -> list[Record]:
    decoder = json.JSONDecoder()
    start = text.index("[")
    try:
        data, stop = decoder.raw_decode(text, start)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{e.lineno}: malformed JSON ({e.msg}): {_snippet(text, e.pos)}") from None
    rest = len(text) - len(text[stop:].lstrip())
    if rest < len(text):  # e.g. two arrays glued together: never drop records silently
        line = text.count("\n", 0, rest) + 1
        raise UserError(f"{p}:{line}: extra text after the JSON array: {_snippet(text, rest)}")
    if not data:
        raise UserError(f"{p}: the JSON array is empty; it needs at least one record")
    # Find each element's line by decoding the array element by element.
    records, pos = [], start + 1
    for item in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        records.append(Record(item, str(p), text.count("\n", 0, pos) + 1))
        pos = end
    return records


def _read_lines(text: str, p: Path) -> list[Record]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(Record(json.loads(line), str(p), number))
        except json.JSONDecodeError as e:
            raise UserError(
                f"{p}:{number}: malformed JSON Lines record ({e.msg}): {_snippet(line, e.pos)}"
            ) from None
    return records


def _snippet(text: str, pos: int, width: int = 40) -> str:
    piece = text[max(0, pos - width) : pos + width].replace("\n", "⏎")
    return repr(piece)


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
    raise UserError(
        f"{record.where()}: cannot tell the format from keys {sorted(d)}; expected one of: "
        "instruction/input/output (alpaca), messages, conversations (sharegpt), conversation "
        "(firefly); or set data.format"
    )


def to_messages(record: Record, fmt: str) -> list[Message]:
    """Convert one record of format ``fmt`` into chat messages."""
    if not isinstance(record.data, dict):
        raise UserError(f"{record.where()}: a record must be a JSON object, got {type(record.data).__name__}")
    return _CONVERTERS[fmt](record)


def _text(record: Record, obj: dict, key: str, *, required: bool = True, field_name: str = "") -> str:
    name = field_name or key
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if required:
            raise UserError(f"{record.where()}: field '{name}' is missing or empty")
        return ""
    if not isinstance(value, str):
        raise UserError(f"{record.where()}: field '{name}' must be text, got {type(value).__name__}")
    return value


def _alpaca(record: Record) -> list[Message]:
    d = record.data
    messages: list[Message] = []
    system = _text(record, d, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = d.get("history") or []
    if not isinstance(history, list):
        raise UserError(f"{record.where()}: field 'history' must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f"{record.where()}: history[{i}] must be a [question, answer] pair of texts")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(record, d, "instruction", required=False)
    extra = _text(record, d, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if instruction and extra else (instruction or extra)
    if not prompt.strip():
        raise UserError(f"{record.where()}: field 'instruction' is missing or empty")
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
    items = record.data.get("messages")
    if not isinstance(items, list) or not items:
        raise UserError(f"{record.where()}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise UserError(f"{record.where()}: messages[{i}].role must be system, user, assistant or tool")
        content = _text(
            record, m, "content", required=m["role"] == "assistant", field_name=f"messages[{i}].content"
        )
        out.append({**m, "role": _ROLES[m["role"]], "content": content})
    return out


def _sharegpt(record: Record) -> list[Message]:
    items = record.data.get("conversations")
    if not isinstance(items, list) or not items:
        raise UserError(f"{record.where()}: field 'conversations' must be a non-empty list")
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
    turns = d.get("conversation")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{record.where()}: field 'conversation' must be a non-empty list")
    out: list[Message] = []
    system = _text(record, d, "system", required=False)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{record.where()}: conversation[{i}] must be an object")
        system = system or _text(record, turn, "system", required=False)
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


_CONVERTERS = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt, "conversation": _conversation}


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
