"""Records as users bring them → lists of chat messages.

Pure functions, no tokenizer and no files (``sources`` reads those): each ``Record`` becomes
``[{"role": ..., "content": ...}, ...]``. Every problem is a :class:`UserError` naming file,
line and field (and the user's own column name when ``data.columns`` renamed it).

Formats read here:
- ``alpaca``: ``instruction``, ``input``, ``output``, optional ``system`` and ``history``
  (a list of ``[question, answer]`` pairs before this one).
- ``messages`` (OpenAI): ``{"messages": [{"role": ..., "content": ...}, ...]}``, optional
  record-level ``tools`` (see :func:`record_tools`); assistant messages may carry ``tool_calls``
  and ``reasoning_content``; ``content`` may be a list of text parts.
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``, optional
  record-level ``system`` and ``tools``; ``function_call`` turns (JSON text) become tool calls,
  ``observation`` turns ``tool`` messages.
- ``conversation`` (Firefly/MOSS): ``{"conversation": [{"human": ..., "assistant": ...}]}``
  with optional ``system``.
- ``text``: ``{"text": ...}`` → one ``text`` message; every token is trained (plain pretraining).
- ``completion``: ``{"prompt": ..., "completion": ...}`` → ``prompt`` and ``completion``
  messages; only the completion is trained.

List fields (``messages``, ``history``, ``tools``, ...) may also arrive as JSON text, as they
do from CSV files and some Parquet exports.

A message's ``loss_weight`` / ``weight`` (0 or 1) or ``train`` (boolean) decides whether an
assistant turn is trained; it is kept as ``train`` on the message. Records that are not SFT data
(preference pairs, KTO labels) and records with images, audio or video are refused here, each
with one line saying why (see :mod:`danlu.data.kinds`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from danlu.data import reasoning
from danlu.data.kinds import kind, media_field, media_marker, media_part, sft_refusal
from danlu.data.tools import function_call, tool_calls, tool_schemas
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
    not_sft = kind(d)
    if not_sft:
        return not_sft
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
        "(firefly), text, prompt/completion (or chosen/rejected, label: preference data); rename "
        "columns with data.columns or set data.format"
    )


def to_messages(record: Record, fmt: str) -> list[Message]:
    """Convert one record of format ``fmt`` into chat messages.

    Refuses records that are not SFT data (whatever ``fmt`` says: a KTO file forced to
    ``messages`` would train its bad replies) and records that carry images, audio or video.
    """
    if not isinstance(record.data, dict):
        raise UserError(f"{record.where()}: a record must be a JSON object, got {type(record.data).__name__}")
    not_sft = kind(record.data)
    if not_sft or fmt not in _CONVERTERS:
        raise UserError(f"{record.where()}: {sft_refusal(not_sft or fmt)}")
    reason = media_field(record.data)
    if reason:
        raise UserError(f"{record.where()}: {reason}")
    messages = _CONVERTERS[fmt](record)
    if fmt not in ("text", "completion"):  # raw text may hold such markers as text
        for m in messages:
            reason = media_marker(m["content"])
            if reason:
                raise UserError(f"{record.where()}: {reason}")
    return messages


def record_tools(record: Record, fmt: str | None = None) -> list[dict] | None:
    """The record-level ``tools`` of a ``messages`` or ``sharegpt`` record as function schemas
    (see :func:`danlu.data.tools.tool_schemas`), or None.

    ``fmt`` defaults to ``record.format``; other formats have no tools.
    """
    if (fmt or record.format) not in ("messages", "sharegpt") or not isinstance(record.data, dict):
        return None
    if record.data.get("tools") in ("", "[]"):  # ShareGPT exports write no tools as empty text
        return None
    tools = _list(record, record.data, "tools", required=False)
    return tool_schemas(tools, record.where()) or None


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


def _content(record: Record, obj: dict, key: str, *, required: bool, field_name: str) -> str:
    """A message's content as text: text, or a list of parts whose text parts are joined
    (OpenAI's ``{"type": "text", "text": ...}``, ``{"type": "text", "value": ...}``, strings).
    Any other part (image, audio, ...) is refused."""
    parts = obj.get(key)
    if not isinstance(parts, list):
        return _text(record, obj, key, required=required, field_name=field_name)
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, dict) and part.get("type", "text") == "text":
            part = part.get("text", part.get("value"))
        elif isinstance(part, dict):
            raise UserError(f"{record.where()}: {field_name}[{j}] {media_part(str(part.get('type')))}")
        if not isinstance(part, str):
            raise UserError(
                f"{record.where()}: {field_name}[{j}] must be text or a text part "
                f'{{"type": "text", "text": ...}}, got {type(part).__name__}'
            )
        texts.append(part)
    return _text(record, {key: "".join(texts)}, key, required=required, field_name=field_name)


_WEIGHTS = ("loss_weight", "weight", "train")


def _trained(record: Record, m: dict, name: str) -> bool | None:
    """A message's ``loss_weight`` / ``weight`` (0 or 1) or ``train`` (boolean), or None."""
    for key in _WEIGHTS:
        value = m.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            return bool(value)
        raise UserError(
            f"{record.where()}: {name}.{key} must be 0 or 1 (true or false): a turn is trained or "
            f"not, got {value!r}"
        )
    return None


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
        name = f"messages[{i}].tool_calls"
        calls = tool_calls(
            _list(record, m, "tool_calls", required=False, field_name=name), record.where(), name
        )
        # an assistant turn that only calls tools has no text
        required = role == "assistant" and not calls
        content = _content(record, m, "content", required=required, field_name=f"messages[{i}].content")
        # Parquet fills absent struct fields with None; drop them so templates see them as absent
        message = {k: v for k, v in m.items() if v is not None and k not in _WEIGHTS}
        message.update(role=role, content=content)
        if calls:
            message["tool_calls"] = calls
        trained = _trained(record, m, f"messages[{i}]")
        if trained is not None and role == "assistant":
            message["train"] = trained
        out.append(reasoning.normalise(message))
    return out


def _sharegpt(record: Record) -> list[Message]:
    items = _list(record, record.data, "conversations")
    record_tools(record, "sharegpt")  # a malformed tools field is this record's error, found now
    out: list[Message] = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("from") not in _ROLES:
            raise UserError(
                f"{record.where()}: conversations[{i}].from must be system, human, gpt, "
                "function_call or observation"
            )
        name = f"conversations[{i}].value"
        if m["from"] == "function_call":  # JSON text {"name": ..., "arguments": ...}: a tool call
            calls = function_call(_text(record, m, "value", field_name=name), record.where(), name)
            if out and out[-1]["role"] == "assistant":  # the reply's text, or parallel calls
                out[-1]["tool_calls"] = [*out[-1].get("tool_calls", []), *calls]
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": calls})
            message = out[-1]
        else:
            message = {
                "role": _ROLES[m["from"]],
                "content": _content(record, m, "value", required=True, field_name=name),
            }
            out.append(message)
        trained = _trained(record, m, f"conversations[{i}]")
        if trained is not None and message["role"] == "assistant":
            message["train"] = trained
    system = _text(record, record.data, "system", required=False)  # LLaMA-Factory's record-level one
    if system and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system})
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
