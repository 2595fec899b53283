"""Tests for ``danlu data check|preview|stats|convert``: the real tokenizer, no weights, no training."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from danlu.app.cli import main
from danlu.config import load_config
from danlu.data.dataset import load_conversations

ALPACA = [
    {"instruction": "Name a colour.", "output": "Blue is a colour."},
    {"instruction": "Count to three.", "input": "Slowly, please.", "output": "One. Two. Three."},
    {
        "instruction": "Describe the sea in detail.",
        "output": "The sea is wide, deep and salty; its waves roll in from far away and break on the shore.",
    },
    {"instruction": "Say hi.", "output": "Hi!"},
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What is two plus two?"},
            {"from": "gpt", "value": "Four."},
            {"from": "human", "value": "And three plus three?"},
            {"from": "gpt", "value": "Six."},
        ]
    },
    {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hello to you."}]},
]


def run(capsys, *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("danlu: error: "), err
    assert "Traceback" not in err
    return lines[0]


def loaded(path: Path) -> tuple[list[list[dict]], str]:
    """Messages and formats as danlu's own loader reads ``path``."""
    cfg = load_config(None, []).data
    cfg.path = [str(path)]
    conversations, formats, _ = load_conversations(cfg)
    return [messages for _, messages in conversations], formats


@pytest.mark.parametrize("action", ["check", "preview", "stats", "convert"])
def test_help_for_each_data_verb(capsys, action):
    with pytest.raises(SystemExit) as info:
        main(["data", action, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--template" in out and "FILES" in out


# --------------------------------------------------------------------------- check


def test_check_counts_records_and_truncation(capsys, tmp_path, default_model_dir, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    limit = 50
    lengths = []
    for messages in loaded(path)[0]:  # independent of data_cli: template text → tokens
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    expected = sum(n > limit for n in lengths)
    assert 0 < expected < len(ALPACA), lengths  # the limit must split the set for the test to mean much

    code, out, err = run(
        capsys, "data", "check", path, "--model", default_model_dir, f"data.max_seq_length={limit}"
    )
    assert code == 0, err
    assert re.search(r"format:\s+alpaca\b", out)
    assert re.search(rf"records:\s+{len(ALPACA)}\b", out)
    assert re.search(rf"truncated:\s+{expected} of {len(ALPACA)} samples at data.max_seq_length={limit}", out)
    assert re.search(rf"max {max(lengths)} \(per sample", out)
    assert "problems:   none" in out


def test_check_bad_record_is_one_error_line(capsys, tmp_path, default_model_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [*ALPACA[:2], {"instruction": "no answer here"}])
    code, out, err = run(capsys, "data", "check", path, "--model", default_model_dir)
    line = one_error_line(code, err)
    assert f"{path}:3" in line and "output" in line


def test_check_skip_reports_the_skipped_line(capsys, tmp_path, default_model_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [ALPACA[0], {"instruction": "no answer here"}, ALPACA[1]])
    code, out, err = run(capsys, "data", "check", path, "--model", default_model_dir, "data.on_error=skip")
    assert code == 0, err
    assert re.search(r"records:\s+2\b", out)
    assert f"skipped 1 bad record: {path}:2" in out


def test_check_reports_unfilled_placeholders(capsys, tmp_path, default_model_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Who are you?", "output": "I am {{name}}."}])
    code, out, _ = run(capsys, "data", "check", path, "--model", default_model_dir)
    assert code == 0 and "unfilled placeholder {{name}}" in out and f"{path}:1" in out
    code, out, _ = run(
        capsys, "data", "check", path, "--model", default_model_dir, "data.placeholders.name=Ada"
    )
    assert code == 0 and "placeholder" not in out


def test_check_refuses_template_without_stop_token(capsys, tmp_path, default_model_dir):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA[:1])
    jinja = tmp_path / "nostop.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    code, _, err = run(capsys, "data", "check", path, "--model", default_model_dir, "--template", jinja)
    line = one_error_line(code, err)
    assert f"{path}:1" in line and "stop token" in line


def test_check_takes_only_data_overrides(capsys, tmp_path, default_model_dir):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA[:1])
    code, _, err = run(capsys, "data", "check", path, "--model", default_model_dir, "train.lr=1e-4")
    assert "train.lr=1e-4" in one_error_line(code, err)


# --------------------------------------------------------------------------- preview


def test_preview_plain_marks_exactly_the_assistant_turn(capsys, tmp_path, default_model_dir):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    code, out, err = run(capsys, "data", "preview", path, "--model", default_model_dir, "-n", "2", "--plain")
    assert code == 0, err
    assert f"{path}:1 (alpaca)" in out and f"{path}:2 (alpaca)" in out and f"{path}:3" not in out
    legend, body = out.split("\n", 1)
    assert "⟦" in legend
    marked = re.findall(r"⟦(.*?)⟧", body, flags=re.S)
    # the span render trains: the reply, its <|im_end|>, and the template's newline after it
    assert marked == [f"{ALPACA[0]['output']}<|im_end|>\n", f"{ALPACA[1]['output']}<|im_end|>\n"]
    assert f"<|im_start|>user\n{ALPACA[0]['instruction']}<|im_end|>" in out  # the prompt, unmarked
    assert "\x1b[" not in out


def test_preview_colours_on_a_terminal(capsys, tmp_path, default_model_dir, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA[:1])
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = run(capsys, "data", "preview", path, "--model", default_model_dir, "-n", "1")
    assert code == 0
    assert f"\x1b[42;30m{ALPACA[0]['output']}<|im_end|>\x1b[0m" in out
    assert "⟦" not in out.split("\n", 1)[1]  # only the legend line may mention the brackets


# --------------------------------------------------------------------------- stats


def test_stats_writes_a_png(capsys, tmp_path, default_model_dir):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    png = tmp_path / "plots" / "lengths.png"
    code, out, err = run(
        capsys, "data", "stats", path, "--model", default_model_dir, "--out", png, "--bins", "10"
    )
    assert code == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert re.search(rf"records:\s+{len(ALPACA)}\b", out) and f"wrote {png}" in out
    assert [p.name for p in png.parent.iterdir()] == ["lengths.png"]  # no temp file left


# --------------------------------------------------------------------------- convert


@pytest.mark.parametrize("records", [ALPACA, SHAREGPT], ids=["alpaca", "sharegpt"])
def test_convert_round_trips(capsys, tmp_path, records):
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    code, stdout, err = run(capsys, "data", "convert", source, "--to", "openai", "--out", out)
    assert code == 0, err
    assert f"wrote {len(records)} records" in stdout
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(set(row) == {"messages"} for row in rows)
    messages, formats = loaded(out)
    assert formats == "messages"
    assert messages == loaded(source)[0]


def test_convert_keeps_tools_and_applies_placeholders(capsys, tmp_path):
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    record = {
        "messages": [
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": "{{who}} says noon."},
        ],
        "tools": tools,
    }
    source = write_jsonl(tmp_path / "in.jsonl", [record])
    out = tmp_path / "out.jsonl"
    code, _, err = run(
        capsys, "data", "convert", source, "--to", "openai", "--out", out, "data.placeholders.who=Ada"
    )
    assert code == 0, err
    row = json.loads(out.read_text(encoding="utf-8"))
    assert row["tools"] == tools and row["messages"][1]["content"] == "Ada says noon."


def test_convert_refuses_existing_out(capsys, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", ALPACA)
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n", encoding="utf-8")
    code, _, err = run(capsys, "data", "convert", source, "--to", "openai", "--out", out)
    assert "--overwrite" in one_error_line(code, err)
    assert out.read_text(encoding="utf-8") == "keep me\n"
    code, _, err = run(capsys, "data", "convert", source, "--to", "openai", "--out", out, "--overwrite")
    assert code == 0, err
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(ALPACA)


def test_convert_refuses_text_records(capsys, tmp_path):
    source = write_jsonl(tmp_path / "text.jsonl", [{"text": "Once upon a time."}, {"text": "The end."}])
    out = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "data", "convert", source, "--to", "openai", "--out", out)
    line = one_error_line(code, err)
    assert f"{source}:1" in line and "text" in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["text.jsonl"]
