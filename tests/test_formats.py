"""Tests for reading data files and turning records into chat messages (no tokenizer)."""

from __future__ import annotations

import json

import pytest

from danlu.data.formats import (
    FORMATS,
    Record,
    apply_columns,
    detect_format,
    fill_placeholders,
    record_tools,
    to_messages,
)
from danlu.errors import UserError


def rec(data, line: int = 1, path: str = "d.jsonl") -> Record:
    return Record(data, path, line)


def convert(data) -> list[dict]:
    record = rec(data)
    return to_messages(record, detect_format(record))


def user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    return str(info.value)


def U(text):  # noqa: N802
    return {"role": "user", "content": text}


def A(text):  # noqa: N802
    return {"role": "assistant", "content": text}


def S(text):  # noqa: N802
    return {"role": "system", "content": text}


# -------------------------------------------------------------------------- readers


def test_alpaca_minimal():
    assert convert({"instruction": "Hi", "input": "", "output": "Hello"}) == [U("Hi"), A("Hello")]


def test_alpaca_instruction_and_input_joined():
    got = convert({"instruction": "Translate to French.", "input": "cat", "output": "chat"})
    assert got == [U("Translate to French.\n\ncat"), A("chat")]


def test_alpaca_input_only():
    assert convert({"input": "2+2?", "output": "4"}) == [U("2+2?"), A("4")]


def test_alpaca_system_and_history():
    got = convert(
        {
            "system": "You are kind.",
            "history": [["q1", "a1"], ["q2", "a2"]],
            "instruction": "q3",
            "input": "",
            "output": "a3",
        }
    )
    assert got == [S("You are kind."), U("q1"), A("a1"), U("q2"), A("a2"), U("q3"), A("a3")]


def test_alpaca_empty_system_adds_nothing():
    assert convert({"system": "", "instruction": "q", "output": "a"}) == [U("q"), A("a")]


def test_openai_messages():
    messages = [S("sys"), U("hello"), A("hi"), U("again"), A("yes")]
    assert convert({"messages": messages}) == messages


def test_openai_messages_keep_extra_keys_and_allow_empty_user():
    got = convert(
        {
            "messages": [
                {"role": "user", "content": None},
                {"role": "assistant", "content": "ok", "name": "bot"},
            ]
        }
    )
    assert got == [U(""), {"role": "assistant", "content": "ok", "name": "bot"}]


def test_sharegpt():
    got = convert(
        {
            "conversations": [
                {"from": "system", "value": "Be short."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Ciao"},
            ]
        }
    )
    assert got == [S("Be short."), U("Hi"), A("Hello"), U("Bye"), A("Ciao")]


def test_firefly_conversation_ignores_extra_fields():
    got = convert(
        {
            "conversation_id": 7,
            "category": "Brainstorming",
            "dataset": "moss",
            "conversation": [
                {"human": "q1", "assistant": "a1", "extra": "ignored"},
                {"human": "q2", "assistant": "a2"},
            ],
        }
    )
    assert got == [U("q1"), A("a1"), U("q2"), A("a2")]


def test_firefly_conversation_with_top_level_system():
    got = convert({"system": "sys", "conversation": [{"human": "q", "assistant": "a"}]})
    assert got == [S("sys"), U("q"), A("a")]


def test_xtuner_conversation_system_in_first_turn():
    got = convert(
        {
            "conversation": [
                {"system": "You are Ada.", "input": "Who are you?", "output": "Ada."},
                {"input": "Sure?", "output": "Yes."},
            ]
        }
    )
    assert got == [S("You are Ada."), U("Who are you?"), A("Ada."), U("Sure?"), A("Yes.")]


# ------------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"output": "b"}, "alpaca"),
        ({"messages": []}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"conversation": []}, "conversation"),
        ({"text": "a"}, "text"),
        ({"prompt": "a", "completion": "b"}, "completion"),
        ({"prompt": "a", "completion": "b", "text": "c"}, "completion"),
        ({"prompt": "a", "text": "c"}, "text"),
        ({"instruction": "a", "output": "b", "text": "c"}, "alpaca"),
        ({"messages": [], "text": "c"}, "messages"),
    ],
)
def test_detect_format(data, fmt):
    assert detect_format(rec(data)) == fmt
    assert fmt in FORMATS


def test_detect_format_unknown_keys():
    message = user_error(detect_format, rec({"question": "a", "answer": "b"}, line=5))
    assert message.startswith("d.jsonl:5:")
    assert "cannot tell the format" in message
    assert "['answer', 'question']" in message
    assert "data.columns" in message and "data.format" in message


@pytest.mark.parametrize(
    ("fmt", "field"),
    [
        ("sharegpt", "conversations"),
        ("messages", "messages"),
        ("conversation", "conversation"),
    ],
)
def test_explicit_format_wrong_for_record_is_a_user_error(fmt, field):
    # alpaca keys, but data.format says otherwise: that reader names its own missing field
    message = user_error(to_messages, rec({"instruction": "a", "output": "b"}, line=3), fmt)
    assert message.startswith("d.jsonl:3:")
    assert f"field '{field}'" in message


def test_explicit_alpaca_on_messages_record():
    message = user_error(to_messages, rec({"messages": [U("q"), A("a")]}), "alpaca")
    assert "field 'instruction' is missing or empty" in message


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"instruction": "q"}, "field 'output' is missing or empty"),
        ({"instruction": "q", "output": "  "}, "field 'output' is missing or empty"),
        ({"instruction": "", "input": "", "output": "a"}, "field 'instruction' is missing or empty"),
        (
            {"conversations": [{"from": "human", "value": ""}]},
            "field 'conversations[0].value' is missing or empty",
        ),
        ({"conversation": [{"human": "q"}]}, "field 'conversation[0].assistant' is missing or empty"),
        (
            {"conversation": [{"input": "q", "output": None}]},
            "field 'conversation[0].output' is missing or empty",
        ),
        (
            {"messages": [U("q"), {"role": "assistant", "content": ""}]},
            "field 'messages[1].content' is missing or empty",
        ),
        ({"messages": []}, "field 'messages' must be a non-empty list"),
        ({"conversations": "hi"}, "field 'conversations' must be a non-empty list"),
        ({"conversation": []}, "field 'conversation' must be a non-empty list"),
        ({"text": "   "}, "field 'text' is missing or empty"),
        ({"prompt": "p", "completion": ""}, "field 'completion' is missing or empty"),
        (
            {"messages": [U("q"), {"role": "assistant", "content": None, "tool_calls": []}]},
            "field 'messages[1].content' is missing or empty",
        ),
    ],
)
def test_missing_or_empty_field_names_line_and_field(data, fragment):
    message = user_error(lambda: to_messages(rec(data, line=9), detect_format(rec(data))))
    assert message.startswith("d.jsonl:9:")
    assert fragment in message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"instruction": "q", "output": 3}, "field 'output' must be text, got int"),
        ({"instruction": ["q"], "output": "a"}, "field 'instruction' must be text, got list"),
        ({"instruction": "q", "output": "a", "history": "x"}, "field 'history' must be a list"),
        (
            {"instruction": "q", "output": "a", "history": [["only one"]]},
            "history[0] must be a [question, answer] pair",
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be"),
        (
            {"messages": [U("q"), {"role": "assistant", "content": {"a": 1}}]},
            "'messages[1].content' must be text, got dict",
        ),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from must be"),
        ({"conversation": ["q"]}, "conversation[0] must be an object"),
        ({"text": 5}, "field 'text' must be text, got int"),
        ({"prompt": ["p"], "completion": "c"}, "field 'prompt' must be text, got list"),
        ({"messages": "[{oops"}, "field 'messages' holds malformed JSON"),
        ({"messages": [A("a")], "tools": "nope"}, "field 'tools' must be a list"),
        ({"messages": [A("a")], "tools": ["nope"]}, "tools[0] must be a function schema"),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": "x"}]},
            "field 'messages[0].tool_calls' must be a list",
        ),
    ],
)
def test_wrong_types(data, fragment):
    message = user_error(lambda: to_messages(rec(data, line=4), detect_format(rec(data))))
    assert message.startswith("d.jsonl:4:")
    assert fragment in message


# ------------------------------------------------------------------- placeholders


def test_fill_placeholders():
    messages = [S("You are {{name}}."), U("who made you?"), A("{{author}} made me, {{name}}. {{other}}")]
    got = fill_placeholders(messages, {"name": "Ada", "author": "Lab"})
    assert got == [S("You are Ada."), U("who made you?"), A("Lab made me, Ada. {{other}}")]
    assert messages[0]["content"] == "You are {{name}}."  # the input is not modified


def test_fill_placeholders_keeps_other_keys_and_handles_empty_values():
    messages = [{"role": "assistant", "content": "{{name}}", "name": "bot"}]
    assert fill_placeholders(messages, {}) == messages
    assert fill_placeholders(messages, {"name": "Ada"}) == [
        {"role": "assistant", "content": "Ada", "name": "bot"}
    ]


# ------------------------------------------------------------------ text, completion


def test_text_format_is_one_text_message():
    assert convert({"text": "Once upon a time"}) == [{"role": "text", "content": "Once upon a time"}]


def test_completion_format():
    assert convert({"prompt": "2+2=", "completion": "4"}) == [
        {"role": "prompt", "content": "2+2="},
        {"role": "completion", "content": "4"},
    ]


def test_completion_allows_an_empty_prompt_but_not_a_missing_one():
    assert to_messages(rec({"prompt": "", "completion": "c"}), "completion")[0] == {
        "role": "prompt",
        "content": "",
    }
    message = user_error(to_messages, rec({"question": "p", "completion": "c"}, line=2), "completion")
    assert message.startswith("d.jsonl:2:")
    assert "field 'prompt' is missing" in message


# ----------------------------------------------------------------------------- tools

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALLS = [{"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]
# as templates take them: arguments a mapping (they write it with tojson)
PARSED = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]


def test_tool_calls_kept_and_content_none_becomes_empty():
    record = rec(
        {
            "tools": TOOLS,
            "messages": [
                U("1+2?"),
                {"role": "assistant", "content": None, "tool_calls": CALLS},
                {"role": "tool", "content": "3", "tool_call_id": "c1"},
                A("3"),
            ],
        }
    )
    assert detect_format(record) == "messages"
    got = to_messages(record, "messages")
    assert got[1] == {"role": "assistant", "content": "", "tool_calls": PARSED}
    assert got[2] == {"role": "tool", "content": "3", "tool_call_id": "c1"}
    assert record_tools(record, "messages") == TOOLS


def test_record_tools_only_for_messages_and_defaults_to_record_format():
    record = rec({"messages": [U("q"), A("a")], "tools": TOOLS})
    assert record_tools(record) is None  # format not known yet
    record.format = "messages"
    assert record_tools(record) == TOOLS
    assert record_tools(rec({"conversation": [], "tools": TOOLS}), "conversation") is None
    assert record_tools(rec({"messages": [U("q"), A("a")]}), "messages") is None
    assert record_tools(rec({"messages": [U("q"), A("a")], "tools": []}), "messages") is None


def test_list_fields_may_be_json_text():
    # CSV cells and some Parquet exports hold lists as JSON text
    record = rec(
        {
            "messages": json.dumps([U("q"), {"role": "assistant", "content": "", "tool_calls": CALLS}]),
            "tools": json.dumps(TOOLS),
        }
    )
    assert to_messages(record, "messages")[1]["tool_calls"] == PARSED
    assert record_tools(record, "messages") == TOOLS
    assert convert({"instruction": "q2", "output": "a2", "history": '[["q1", "a1"]]'}) == [
        U("q1"),
        A("a1"),
        U("q2"),
        A("a2"),
    ]


def test_none_valued_message_keys_are_dropped():
    # Parquet gives every message every struct field, None where a message had none
    got = convert({"messages": [{"role": "user", "content": "q", "name": None, "tool_calls": None}, A("a")]})
    assert got == [U("q"), A("a")]


# --------------------------------------------------------------------------- columns


def test_columns_rename_before_detection():
    record = apply_columns(
        rec({"question": "q", "answer": "a", "id": 3}), {"instruction": "question", "output": "answer"}
    )
    assert record.data == {"instruction": "q", "output": "a", "id": 3}
    assert detect_format(record) == "alpaca"
    assert to_messages(record, "alpaca") == [U("q"), A("a")]


def test_columns_drop_the_users_names_so_they_do_not_mislead_detection():
    # their "input"/"output" are our prompt/completion: no alpaca keys may remain
    record = apply_columns(rec({"input": "p", "output": "c"}), {"prompt": "input", "completion": "output"})
    assert record.data == {"prompt": "p", "completion": "c"}
    assert detect_format(record) == "completion"


def test_columns_keep_our_own_name_when_the_column_is_absent():
    record = apply_columns(rec({"instruction": "q", "output": "a"}), {"output": "answer"})
    assert to_messages(record, "alpaca") == [U("q"), A("a")]


def test_missing_mapped_field_names_the_column():
    record = apply_columns(
        rec({"question": "q", "reply": "a"}, line=7), {"instruction": "question", "output": "answer"}
    )
    message = user_error(to_messages, record, "alpaca")
    assert message.startswith("d.jsonl:7:")
    assert "field 'output' (column 'answer') is missing or empty" in message


def test_mapped_list_field_error_names_the_column():
    record = apply_columns(rec({"dialog": "hi"}), {"messages": "dialog"})
    assert "field 'messages' (column 'dialog') must be a non-empty list" in user_error(
        to_messages, record, "messages"
    )


def test_columns_leave_non_objects_alone():
    record = rec([1, 2])
    assert apply_columns(record, {"output": "answer"}) is record


def test_parquet_records_name_rows():
    assert Record({}, "d.parquet", 3).where() == "d.parquet row 3"
    assert Record({}, "d.jsonl", 3).where() == "d.jsonl:3"
