"""Records → conversations through a data config: formats, system prompts, placeholders (split from test_formats.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_jsonl
from danlu.config import DataConfig
from danlu.data.dataset import load_conversations
from danlu.data.formats import (
    to_messages,
)
from test_formats import A, S, U, convert, rec, user_error

# -------------------------------------------------------------- load_conversations


def test_load_conversations_detects_and_fills(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "hi", "output": "I am {{name}}."}])
    conversations, fmt, _ = load_conversations(DataConfig(path=[str(path)], placeholders={"name": "Ada"}))
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
    conversations, fmt, _ = load_conversations(DataConfig(path=[str(path)], system="Default sys."))
    assert fmt == "messages"
    assert [m for _, m in conversations] == [
        [S("Default sys."), U("q1"), A("a1")],
        [S("own system"), U("q2"), A("a2")],
    ]


def test_load_conversations_without_system_setting_adds_none(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [U("q"), A("a")]}])
    conversations, _, _ = load_conversations(DataConfig(path=[str(path)]))
    assert conversations[0][1] == [U("q"), A("a")]


def test_load_conversations_needs_an_assistant_turn(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [U("q"), A("a")]},
            {"messages": [S("s"), U("only a question")]},
        ],
    )
    message = user_error(load_conversations, DataConfig(path=[str(path)], system="x"))
    assert message.startswith(f"{path}:2:")
    assert "no assistant" in message


def test_load_conversations_explicit_format(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
    )
    conversations, fmt, _ = load_conversations(DataConfig(path=[str(path)], format="sharegpt"))
    assert fmt == "sharegpt"
    assert conversations[0][1] == [U("q"), A("a")]


def test_load_conversations_needs_a_path():
    assert "data.path is not set" in user_error(load_conversations, DataConfig())


def test_load_conversations_empty_array_is_a_user_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[]", encoding="utf-8")
    assert "empty" in user_error(load_conversations, DataConfig(path=[str(path)]))


def test_load_conversations_warns_about_unfilled_placeholders(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "hi", "output": "I am {{name}} by {{ author }}."}]
    )
    with caplog.at_level("WARNING", logger="danlu.data.dataset"):
        load_conversations(DataConfig(path=[str(path)], placeholders={"other": "x"}))
    assert "{{author, name}}" in caplog.text


def test_bundled_identity_data_converts(tmp_path):
    bundled = Path(__file__).resolve().parent.parent / "src" / "danlu" / "configs" / "identity.json"
    conversations, fmt, _ = load_conversations(
        DataConfig(path=[str(bundled)], placeholders={"name": "Ada", "author": "Lab"})
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
