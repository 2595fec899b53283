"""Tests for reading data files, folders and globs, and for mixing sources (no tokenizer)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from danlu.config import DataConfig
from danlu.data.formats import detect_format, record_tools, to_messages
from danlu.data.sources import SkipReport, expand, load_sources, read_file
from danlu.errors import UserError


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message  # errors are one line
    return message


def U(text):  # noqa: N802
    return {"role": "user", "content": text}


def A(text):  # noqa: N802
    return {"role": "assistant", "content": text}


def alpaca(n: int, prefix: str = "q") -> list[dict]:
    return [{"instruction": f"{prefix}{i}", "output": f"a{i}"} for i in range(n)]


def load(*paths, **settings):
    return load_sources(DataConfig(path=[str(p) for p in paths], **settings))


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]], **kw) -> Path:
    with open(path, "w", encoding=kw.pop("encoding", "utf-8"), newline="") as f:
        csv.writer(f, **kw).writerows([header, *rows])
    return path


def prompts(pairs) -> list[str]:
    return [messages[0]["content"] for _, messages in pairs]


# -------------------------------------------------------------------------- files


RECORDS = [{"instruction": "q1", "output": "a1"}, {"instruction": "q2", "output": "a2"}]


def test_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    records = read_file(path)
    assert [r.data for r in records] == RECORDS
    assert [r.line for r in records] == [1, 2]
    assert records[1].where() == f"{path}:2"


def test_json_lines_skip_blank_lines_and_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n" + json.dumps(RECORDS[0]) + "\n\n  \n" + json.dumps(RECORDS[1]) + "\n", encoding="utf-8"
    )
    assert [r.line for r in read_file(path)] == [2, 5]


def test_json_lines_named_json(tmp_path):
    path = write_jsonl(tmp_path / "d.json", RECORDS)
    assert [r.data for r in read_file(path)] == RECORDS


def test_json_array_named_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    assert [r.data for r in read_file(path)] == RECORDS


def test_array_line_numbers_are_where_elements_start(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS + [{"instruction": "q3", "output": "a3"}], indent=2), encoding="utf-8")
    # line 1 is "[", each record spans 4 lines: "{", two fields, "}"
    assert [r.line for r in read_file(path)] == [2, 6, 10]


def test_array_line_numbers_with_leading_text_and_nested_lists(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '\n\n[{"instruction": "q",\n  "history": [["a", "b"]],\n  "output": "o"},\n\n'
        '   {"messages": [{"role": "user", "content": "x"}]}]\n',
        encoding="utf-8",
    )
    assert [r.line for r in read_file(path)] == [3, 7]


def test_bom_and_crlf_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    body = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    records = read_file(path)
    assert [r.data for r in records] == RECORDS
    assert [r.line for r in records] == [1, 2]


def test_bom_and_crlf_in_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS, indent=2).replace("\n", "\r\n").encode("utf-8"))
    records = read_file(path)
    assert [r.data for r in records] == RECORDS
    assert [r.line for r in records] == [2, 6]


def test_chinese_text_round_trips(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "你好", "output": "你好！我是丹炉。"}])
    (record,) = read_file(path)
    assert to_messages(record, detect_format(record)) == [U("你好"), A("你好！我是丹炉。")]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"instruction": "q", "output": \n', encoding="utf-8")
    message = user_error(read_file, path)
    assert message.startswith(f"{path}:2:")
    assert "malformed JSON" in message


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]\n',
        encoding="utf-8",
    )
    message = user_error(read_file, path)
    assert message.startswith(f"{path}:3:")
    assert "malformed JSON" in message


def test_text_after_json_array_is_an_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS[:1]) + "\n" + json.dumps(RECORDS[1:]) + "\n", encoding="utf-8")
    message = user_error(read_file, path)
    assert message.startswith(f"{path}:2:")
    assert "after the JSON array" in message


def test_empty_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[]\n", encoding="utf-8")
    message = user_error(read_file, path)
    assert message.startswith(f"{path}:")
    assert "empty" in message


def test_non_utf8_file_suggests_iconv(tmp_path):
    path = tmp_path / "d.jsonl"
    good = (json.dumps(RECORDS[0]) + "\n").encode("utf-8")
    bad = b'{"instruction": "' + "你好".encode("gbk") + b'", "output": "a"}\n'
    path.write_bytes(good + bad)
    message = user_error(read_file, path)
    assert message.startswith(f"{path}:2:")
    assert "UTF-8" in message
    assert "iconv" in message


def test_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    message = user_error(read_file, path)
    assert message.startswith(str(path))
    assert "empty" in message


def test_missing_file_and_folder(tmp_path):
    assert "data file not found" in user_error(read_file, tmp_path / "nope.jsonl")
    assert "is a folder" in user_error(read_file, tmp_path)


@pytest.mark.parametrize("line", ["[1, 2]", "7", '"text"', "null"])
def test_non_object_record(tmp_path, line):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n", encoding="utf-8")
    records = read_file(path)
    message = user_error(detect_format, records[-1])
    assert message.startswith(f"{path}:2:")
    assert "must be a JSON object" in message
    message = user_error(to_messages, records[-1], "alpaca")
    assert "must be a JSON object" in message


def test_non_object_element_in_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n  "oops"\n]\n', encoding="utf-8")
    records = read_file(path)
    message = user_error(to_messages, records[1], "alpaca")
    assert message.startswith(f"{path}:3:")
    assert "got str" in message


def test_malformed_json_line_goes_to_the_skip_report_when_given(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{oops\n" + json.dumps(RECORDS[1]) + "\n", encoding="utf-8")
    skipped = SkipReport()
    assert [r.line for r in read_file(path, skipped)] == [1, 3]
    assert skipped.count == 1
    assert skipped.items[0][0] == f"{path}:2"
    assert "malformed JSON Lines" in skipped.items[0][1]


def test_one_json_object_file_is_explained(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": RECORDS}, indent=2), encoding="utf-8")
    assert "one JSON object" in user_error(read_file, path)


def test_unclosed_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "q", "output": "a"},\n', encoding="utf-8")
    assert "never closed" in user_error(read_file, path)


# -------------------------------------------------------------------------- expand


@pytest.fixture
def tree(tmp_path):
    """data/a.jsonl, data/b.json, data/sub/c.csv, data/sub/d.parquet, plus files to leave out."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / ".cache").mkdir()
    write_jsonl(data / "a.jsonl", alpaca(2, "a"))
    write_jsonl(data / "b.json", alpaca(2, "b"))
    write_csv(data / "sub" / "c.csv", ["instruction", "output"], [["c0", "x"]])
    write_parquet(data / "sub" / "d.parquet", alpaca(1, "d"))
    (data / "README.md").write_text("# notes\n", encoding="utf-8")
    write_jsonl(data / ".cache" / "e.jsonl", alpaca(1, "e"))
    write_jsonl(data / ".hidden.jsonl", alpaca(1, "h"))
    return data


def test_expand_file(tree):
    assert expand(str(tree / "README.md")) == [tree / "README.md"]  # named files are read whatever they are


def test_expand_folder_is_recursive_sorted_and_skips_hidden(tree):
    assert expand(str(tree)) == [
        tree / "a.jsonl",
        tree / "b.json",
        tree / "sub" / "c.csv",
        tree / "sub" / "d.parquet",
    ]


def test_expand_globs(tree):
    assert expand(str(tree / "*.jsonl")) == [tree / "a.jsonl"]
    assert expand(str(tree / "**" / "*.parquet")) == [tree / "sub" / "d.parquet"]
    assert expand(str(tree / "*")) == [
        tree / "a.jsonl",
        tree / "b.json",
        tree / "sub" / "c.csv",
        tree / "sub" / "d.parquet",
    ]


def test_expand_errors_name_the_entry(tmp_path, tree):
    entry = str(tree / "*.xml")
    assert f"the glob {entry} matches no" in user_error(expand, entry)
    missing = str(tmp_path / "nope.jsonl")
    assert f"data.path: {missing} not found" in user_error(expand, missing)
    (tmp_path / "empty").mkdir()
    assert "holds no .json/.jsonl/.parquet/.csv/.txt/.md files" in user_error(expand, str(tmp_path / "empty"))


def test_load_folder_reads_every_kind(tree):
    pairs, skipped = load(tree)
    assert prompts(pairs) == ["a0", "a1", "b0", "b1", "c0", "d0"]
    assert skipped.count == 0


# ------------------------------------------------------------------- load_sources


def test_each_file_detects_its_own_format(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(2))
    m = write_jsonl(tmp_path / "m.jsonl", [{"messages": [U("mq"), A("ma")]}])
    pairs, _ = load(a, m)
    assert [r.format for r, _ in pairs] == ["alpaca", "alpaca", "messages"]
    assert [ms for _, ms in pairs] == [[U("q0"), A("a0")], [U("q1"), A("a1")], [U("mq"), A("ma")]]


def test_explicit_format_applies_to_every_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(1))
    m = write_jsonl(tmp_path / "m.jsonl", [{"messages": [U("mq"), A("ma")]}])
    message = user_error(load, a, m, format="alpaca")
    assert message.startswith(f"{m}:1: field 'instruction' is missing or empty; record: ")


def test_format_is_detected_from_the_first_good_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["not a record", {"text": "hello"}])
    pairs, skipped = load(path, on_error="skip")
    assert pairs[0][0].format == "text"
    assert skipped.items == [(f"{path}:1", "a record must be a JSON object, got str")]


def test_text_and_completion_files_need_no_assistant(tmp_path):
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "c"}])
    pairs, _ = load(t, c)
    assert [ms for _, ms in pairs] == [
        [{"role": "text", "content": "plain"}],
        [{"role": "prompt", "content": "p"}, {"role": "completion", "content": "c"}],
    ]


def test_chat_record_without_assistant_is_bad(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [U("q"), A("a")]}, {"messages": [U("only")]}])
    assert user_error(load, path).startswith(f"{path}:2: record has no assistant reply")
    pairs, skipped = load(path, on_error="skip")
    assert len(pairs) == 1 and skipped.count == 1


def test_tools_survive_loading(tmp_path):
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    call = [{"type": "function", "function": {"name": "now", "arguments": "{}"}}]
    messages = [
        U("time?"),
        {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "content": "9:00"},
        A("9"),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages, "tools": tools}])
    (record, got), *_ = load(path)[0]
    assert record_tools(record) == tools
    # templates write arguments with tojson: JSON text is read into a mapping
    parsed = [{"type": "function", "function": {"name": "now", "arguments": {}}}]
    assert got[1] == {"role": "assistant", "content": "", "tool_calls": parsed}


def test_columns_map_before_detection_and_errors_name_the_column(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"question": "q0", "answer": "a0"}, {"question": "q1", "reply": "a1"}]
    )
    columns = {"instruction": "question", "output": "answer"}
    message = user_error(load, path, columns=columns)
    assert message.startswith(f"{path}:2: field 'output' (column 'answer') is missing or empty")
    assert message.endswith('record: {"question": "q1", "reply": "a1"}')  # the record as the user wrote it
    pairs, skipped = load(path, columns=columns, on_error="skip")
    assert [ms for _, ms in pairs] == [[U("q0"), A("a0")]]
    assert pairs[0][0].data == {"instruction": "q0", "output": "a0"}
    assert skipped.items == [(f"{path}:2", "field 'output' (column 'answer') is missing or empty")]


def test_long_records_are_cut_in_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x" * 500}])
    snippet = user_error(load, path).split("; record: ")[1]
    assert len(snippet) == 80
    assert snippet.endswith("…")


def test_skip_reports_bad_records_and_keeps_the_rest(tmp_path):
    rows = alpaca(10)
    rows[3] = {"instruction": "q3"}
    rows[6] = {"instruction": "q6", "output": 6}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n", encoding="utf-8")
    pairs, skipped = load(path, on_error="skip")
    assert prompts(pairs) == ["q0", "q1", "q2", "q4", "q5", "q7", "q8", "q9"]
    assert skipped.count == 3
    assert [where for where, _ in skipped.items] == [f"{path}:11", f"{path}:4", f"{path}:7"]
    assert skipped.line().startswith(
        f"skipped 3 bad records: {path}:11 (malformed JSON Lines record (Expecting property name enclosed"
    )
    assert (
        f"{path}:4 (field 'output' is missing or empty), {path}:7 (field 'output' must be text, got int)"
        in (skipped.line())
    )


def test_skip_report_line_is_short():
    report = SkipReport([(f"d.jsonl:{i}", "bad") for i in range(1, 9)])
    assert report.line() == (
        "skipped 8 bad records: d.jsonl:1 (bad), d.jsonl:2 (bad), d.jsonl:3 (bad), d.jsonl:4 (bad), "
        "d.jsonl:5 (bad), and 3 more"
    )
    assert SkipReport([("d.jsonl:1", "bad")]).line() == "skipped 1 bad record: d.jsonl:1 (bad)"
    assert SkipReport().count == 0


def test_raise_stops_at_the_first_bad_record(tmp_path):
    rows = alpaca(5)
    rows[2] = {"instruction": "q2"}
    rows[4] = {"output": 1}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert user_error(load, path).startswith(f"{path}:3: field 'output' is missing or empty; record: ")


def test_all_bad_raises_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q"}, {"instruction": "q2"}])
    message = user_error(load, path, on_error="skip")
    assert message.startswith(f"{path}: all 2 records are bad, e.g. {path}:1: field 'output' is missing")


def test_no_path():
    assert user_error(load_sources, DataConfig()) == (
        "data.path is not set; give a .json/.jsonl/.parquet/.csv file, e.g. data.path=train.jsonl"
    )
    assert "data.path is not set" in user_error(load_sources, DataConfig(path=["x.jsonl"]), [])


def test_a_plain_string_path_is_one_entry(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca(2))
    pairs, _ = load_sources(DataConfig(), str(path))
    assert prompts(pairs) == ["q0", "q1"]


# ------------------------------------------------------------------------ weights


@pytest.fixture
def two_sets(tmp_path):
    return write_jsonl(tmp_path / "a.jsonl", alpaca(10, "a")), write_jsonl(
        tmp_path / "b.jsonl", alpaca(10, "b")
    )


def test_weights_repeat_and_subsample_in_entry_order(two_sets):
    a, b = two_sets
    pairs, _ = load(a, b, weights=[2.0, 0.5])
    got = prompts(pairs)
    assert len(got) == 25
    assert got[:20] == [f"a{i}" for i in range(10)] * 2
    half = got[20:]
    assert len(set(half)) == 5 and all(p.startswith("b") for p in half)
    assert half == sorted(half, key=lambda p: int(p[1:]))  # a subsample keeps file order


def test_fractional_weight_above_one(two_sets):
    a, _ = two_sets
    got = prompts(load(a, weights=[1.5])[0])
    assert got[:10] == [f"a{i}" for i in range(10)]
    assert len(got) == 15 and len(set(got[10:])) == 5


def test_weights_are_deterministic_by_seed(two_sets):
    a, b = two_sets

    def half_of_b(seed):
        return prompts(load(a, b, weights=[1.0, 0.5], seed=seed)[0])[10:]

    assert half_of_b(1) == half_of_b(1)
    assert {tuple(half_of_b(s)) for s in range(6)} != {tuple(half_of_b(1))}  # the seed matters
    # the entry's position feeds the seed too: the same file at positions 0 and 1 samples differently
    both = prompts(load(b, b, weights=[0.5, 0.5], seed=3)[0])
    assert both[:5] != both[5:]


def test_explicit_paths_ignore_cfg_weights(two_sets):
    a, b = two_sets
    cfg = DataConfig(path=[str(a), str(b)], weights=[2.0, 0.5])
    assert len(load_sources(cfg, [str(a)])[0]) == 10
    assert len(load_sources(cfg, [str(a)], [0.5])[0]) == 5


def test_weights_must_match_paths(two_sets):
    a, b = two_sets
    assert "data.weights has 1 values for 2 data.path entries" in user_error(
        load_sources, DataConfig(), [str(a), str(b)], [1.0]
    )


def test_a_file_without_rows_after_a_file_with_skips_still_raises(tmp_path):
    bad = tmp_path / "a.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{oops\n", encoding="utf-8")
    empty = tmp_path / "b.csv"
    empty.write_text("instruction,output\n", encoding="utf-8")
    message = user_error(load, bad, empty, on_error="skip")
    assert message.startswith(f"{empty}: the file holds no records")


def test_expand_understands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write_jsonl(tmp_path / "d.jsonl", alpaca(1))
    assert expand("~/d.jsonl") == [path]
