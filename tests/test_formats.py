"""Tests for reading data files and turning records into chat messages (no tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from danlu.config import DataConfig
from danlu.data.dataset import load_conversations
from danlu.data.formats import (
    FORMATS,
    Record,
    detect_format,
    fill_placeholders,
    read_records,
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
    ],
)
def test_detect_format(data, fmt):
    assert detect_format(rec(data)) == fmt
    assert fmt in FORMATS


def test_detect_format_unknown_keys():
    message = user_error(detect_format, rec({"prompt": "a", "completion": "b"}, line=5))
    assert message.startswith("d.jsonl:5:")
    assert "cannot tell the format" in message
    assert "data.format" in message


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


# -------------------------------------------------------------------------- files


RECORDS = [{"instruction": "q1", "output": "a1"}, {"instruction": "q2", "output": "a2"}]


def test_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    records = read_records(path)
    assert [r.data for r in records] == RECORDS
    assert [r.line for r in records] == [1, 2]
    assert records[1].where() == f"{path}:2"


def test_json_lines_skip_blank_lines_and_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n" + json.dumps(RECORDS[0]) + "\n\n  \n" + json.dumps(RECORDS[1]) + "\n", encoding="utf-8"
    )
    assert [r.line for r in read_records(path)] == [2, 5]


def test_json_lines_named_json(tmp_path):
    path = write_jsonl(tmp_path / "d.json", RECORDS)
    assert [r.data for r in read_records(path)] == RECORDS


def test_json_array_named_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    assert [r.data for r in read_records(path)] == RECORDS


def test_array_line_numbers_are_where_elements_start(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS + [{"instruction": "q3", "output": "a3"}], indent=2), encoding="utf-8")
    # line 1 is "[", each record spans 4 lines: "{", two fields, "}"
    assert [r.line for r in read_records(path)] == [2, 6, 10]


def test_array_line_numbers_with_leading_text_and_nested_lists(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '\n\n[{"instruction": "q",\n  "history": [["a", "b"]],\n  "output": "o"},\n\n'
        '   {"messages": [{"role": "user", "content": "x"}]}]\n',
        encoding="utf-8",
    )
    assert [r.line for r in read_records(path)] == [3, 7]


def test_bom_and_crlf_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    body = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    records = read_records(path)
    assert [r.data for r in records] == RECORDS
    assert [r.line for r in records] == [1, 2]


def test_bom_and_crlf_in_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS, indent=2).replace("\n", "\r\n").encode("utf-8"))
    records = read_records(path)
    assert [r.data for r in records] == RECORDS
    assert [r.line for r in records] == [2, 6]


def test_chinese_text_round_trips(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "你好", "output": "你好！我是丹炉。"}])
    assert convert(read_records(path)[0].data) == [U("你好"), A("你好！我是丹炉。")]


# ------------------------------------------------------------------------- errors


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"instruction": "q", "output": \n', encoding="utf-8")
    message = user_error(read_records, path)
    assert message.startswith(f"{path}:2:")
    assert "malformed JSON" in message


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]\n',
        encoding="utf-8",
    )
    message = user_error(read_records, path)
    assert message.startswith(f"{path}:3:")
    assert "malformed JSON" in message


def test_text_after_json_array_is_an_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS[:1]) + "\n" + json.dumps(RECORDS[1:]) + "\n", encoding="utf-8")
    message = user_error(read_records, path)
    assert message.startswith(f"{path}:2:")
    assert "after the JSON array" in message


def test_empty_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[]\n", encoding="utf-8")
    message = user_error(read_records, path)
    assert message.startswith(f"{path}:")
    assert "empty" in message


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
    ],
)
def test_wrong_types(data, fragment):
    message = user_error(lambda: to_messages(rec(data, line=4), detect_format(rec(data))))
    assert message.startswith("d.jsonl:4:")
    assert fragment in message


def test_non_utf8_file_suggests_iconv(tmp_path):
    path = tmp_path / "d.jsonl"
    good = (json.dumps(RECORDS[0]) + "\n").encode("utf-8")
    bad = b'{"instruction": "' + "你好".encode("gbk") + b'", "output": "a"}\n'
    path.write_bytes(good + bad)
    message = user_error(read_records, path)
    assert message.startswith(f"{path}:2:")
    assert "UTF-8" in message
    assert "iconv" in message


def test_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    message = user_error(read_records, path)
    assert message.startswith(str(path))
    assert "empty" in message


def test_missing_file_and_folder(tmp_path):
    assert "data file not found" in user_error(read_records, tmp_path / "nope.jsonl")
    assert "is a folder" in user_error(read_records, tmp_path)


@pytest.mark.parametrize("line", ["[1, 2]", "7", '"text"', "null"])
def test_non_object_record(tmp_path, line):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n", encoding="utf-8")
    records = read_records(path)
    message = user_error(detect_format, records[-1])
    assert message.startswith(f"{path}:2:")
    assert "must be a JSON object" in message
    message = user_error(to_messages, records[-1], "alpaca")
    assert "must be a JSON object" in message


def test_non_object_element_in_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n  "oops"\n]\n', encoding="utf-8")
    records = read_records(path)
    message = user_error(to_messages, records[1], "alpaca")
    assert message.startswith(f"{path}:3:")
    assert "got str" in message


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


# -------------------------------------------------------------- load_conversations


def test_load_conversations_detects_and_fills(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "hi", "output": "I am {{name}}."}])
    conversations, fmt = load_conversations(DataConfig(path=str(path), placeholders={"name": "Ada"}))
    assert fmt == "alpaca"
    assert len(conversations) == 1
    record, messages = conversations[0]
    assert record.line == 1
    assert messages == [U("hi"), A("I am Ada.")]


def test_load_conversations_system_added_only_when_missing(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [U("q1"), A("a1")]},
            {"messages": [S("own system"), U("q2"), A("a2")]},
        ],
    )
    conversations, fmt = load_conversations(DataConfig(path=str(path), system="Default sys."))
    assert fmt == "messages"
    assert [m for _, m in conversations] == [
        [S("Default sys."), U("q1"), A("a1")],
        [S("own system"), U("q2"), A("a2")],
    ]


def test_load_conversations_without_system_setting_adds_none(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [U("q"), A("a")]}])
    conversations, _ = load_conversations(DataConfig(path=str(path)))
    assert conversations[0][1] == [U("q"), A("a")]


def test_load_conversations_needs_an_assistant_turn(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [U("q"), A("a")]},
            {"messages": [S("s"), U("only a question")]},
        ],
    )
    message = user_error(load_conversations, DataConfig(path=str(path), system="x"))
    assert message.startswith(f"{path}:2:")
    assert "no assistant" in message


def test_load_conversations_explicit_format(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
    )
    conversations, fmt = load_conversations(DataConfig(path=str(path), format="sharegpt"))
    assert fmt == "sharegpt"
    assert conversations[0][1] == [U("q"), A("a")]


def test_load_conversations_needs_a_path():
    assert "data.path is not set" in user_error(load_conversations, DataConfig())


def test_load_conversations_empty_array_is_a_user_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[]", encoding="utf-8")
    assert "empty" in user_error(load_conversations, DataConfig(path=str(path)))


def test_load_conversations_warns_about_unfilled_placeholders(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "hi", "output": "I am {{name}} by {{ author }}."}]
    )
    with caplog.at_level("WARNING", logger="danlu.data.dataset"):
        load_conversations(DataConfig(path=str(path), placeholders={"other": "x"}))
    assert "{{author, name}}" in caplog.text


def test_bundled_identity_data_converts(tmp_path):
    bundled = Path(__file__).resolve().parent.parent / "src" / "danlu" / "configs" / "identity.json"
    conversations, fmt = load_conversations(
        DataConfig(path=str(bundled), placeholders={"name": "Ada", "author": "Lab"})
    )
    assert fmt == "alpaca"
    assert len(conversations) > 5
    assert all("{{" not in m["content"] for _, ms in conversations for m in ms)
    assert any("Ada" in ms[-1]["content"] for _, ms in conversations)


@pytest.mark.parametrize(
    ("turn", "field"),
    [
        ({"assistant": "a"}, "conversation[0].human"),
        ({"output": "a"}, "conversation[0].input"),
        ({"input": "q"}, "conversation[0].output"),
        ({"human": "q"}, "conversation[0].assistant"),
    ],
)
def test_conversation_missing_half_named_in_the_turns_own_vocabulary(turn, field):
    message = user_error(to_messages, rec({"conversation": [turn]}), "conversation")
    assert f"field '{field}' is missing or empty" in message


def test_conversation_mixed_keys_still_read():
    assert convert({"conversation": [{"human": "q", "output": "a"}]}) == [U("q"), A("a")]
