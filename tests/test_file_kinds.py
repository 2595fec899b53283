"""Reading Parquet, CSV and non-UTF-8 files (split from test_sources.py, whose helpers it uses)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from danlu.data.formats import detect_format, to_messages
from danlu.data.sources import SkipReport, read_file
from test_sources import RECORDS, A, U, load, user_error, write_csv, write_parquet

# --------------------------------------------------------------------------- Parquet


def test_parquet_rows_and_where(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", RECORDS)
    records = read_file(path)
    assert [r.data for r in records] == RECORDS
    assert [r.line for r in records] == [1, 2]
    assert records[1].where() == f"{path} row 2"


def test_parquet_nested_messages_convert(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "q", "name": "ann"}, A("a")]},
        {"messages": [U("q2"), A("a2")]},
    ]
    records = read_file(write_parquet(tmp_path / "d.parquet", rows))
    # Parquet gives the second row a name=None; it must not reach the template
    assert to_messages(records[1], detect_format(records[1])) == [U("q2"), A("a2")]
    assert to_messages(records[0], "messages")[0] == {"role": "user", "content": "q", "name": "ann"}


def test_parquet_bad_record_is_named_by_row(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"instruction": "q", "output": "a"}, {"instruction": "q"}])
    message = user_error(load, path)
    assert message.startswith(f"{path} row 2: field 'output' is missing or empty")


def test_parquet_without_rows(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), path)
    assert "no rows" in user_error(read_file, path)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("instruction,output\n", encoding="utf-8")
    assert "not a readable Parquet file" in user_error(read_file, path)


# ------------------------------------------------------------------------------- CSV


def test_csv_quoted_commas_and_newlines_keep_real_line_numbers(tmp_path):
    path = write_csv(
        tmp_path / "d.csv",
        ["instruction", "input", "output"],
        [["Say hi, politely", "", "Hello,\nfriend"], ["q2", "x", "a2"]],
    )
    records = read_file(path)
    assert records[0].data == {
        "instruction": "Say hi, politely",
        "output": "Hello,\nfriend",
    }  # empty = missing
    assert records[1].data == {"instruction": "q2", "input": "x", "output": "a2"}
    assert [r.line for r in records] == [2, 4]  # row 1 spans lines 2 and 3
    assert to_messages(records[0], detect_format(records[0])) == [U("Say hi, politely"), A("Hello,\nfriend")]


def test_csv_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'\xef\xbb\xbfprompt,completion\r\n\r\np1,c1\r\n"p2","c\r\n2"\r\n')
    records = read_file(path)
    assert [r.data for r in records] == [
        {"prompt": "p1", "completion": "c1"},
        {"prompt": "p2", "completion": "c\n2"},
    ]
    assert [r.line for r in records] == [3, 4]


def test_csv_bad_line_names_its_line(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["instruction", "output"], [["q1", "a1"], ["q2", ""]])
    assert user_error(load, path).startswith(f"{path}:3: field 'output' is missing or empty")


def test_csv_row_with_extra_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\nq1,a1\nq2,a, b\n", encoding="utf-8")
    message = user_error(read_file, path)
    assert message.startswith(f"{path}:3:")
    assert "3 cells but the header has 2" in message
    skipped = SkipReport()
    assert len(read_file(path, skipped)) == 1
    assert skipped.count == 1


@pytest.mark.parametrize("text", ["", "instruction,output\n", "instruction,output\n\n"])
def test_csv_without_rows(tmp_path, text):
    path = tmp_path / "d.csv"
    path.write_text(text, encoding="utf-8")
    message = user_error(read_file, path)
    assert message.startswith(str(path))
    assert "empty" in message or "no records" in message


def test_csv_messages_as_json_cells(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["messages"], [[json.dumps([U("q"), A("a")])]])
    pairs, _ = load(path)
    assert pairs[0][1] == [U("q"), A("a")]
    assert pairs[0][0].format == "messages"


# -------------------------------------------------------------------------- encodings


def test_gbk_file_is_named_with_the_fix(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(
        json.dumps([{"instruction": "请写一首诗", "output": "春风吹绿江南岸。"}], ensure_ascii=False).encode(
            "gbk"
        )
    )
    message = user_error(read_file, path)
    assert message.startswith(f"{path}:1: not UTF-8 text, it looks like GBK")
    assert "iconv -f GBK -t UTF-8 train.json > train.utf8.json" in message
    assert "read_text('gbk')" in message


def test_big5_file_is_named_big5(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        json.dumps({"instruction": "這是一個測試，我們在說話。", "output": "好"}, ensure_ascii=False).encode(
            "big5"
        )
    )
    assert "looks like Big5" in user_error(read_file, path)


def test_shift_jis_file_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        json.dumps({"text": "これは日本語のテストです。"}, ensure_ascii=False).encode("shift_jis")
    )
    assert "looks like Shift_JIS" in user_error(read_file, path)


def test_utf16_file_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text\nhello\n".encode("utf-16"))
    message = user_error(read_file, path)
    assert "looks like UTF-16" in message
    assert "iconv -f UTF-16 -t UTF-8 d.csv > d.utf8.csv" in message


def test_unknown_encoding_still_gives_a_fix(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + b'{"text": "\x80\x80"}\n')
    message = user_error(read_file, path)
    assert message.startswith(f"{path}:2: not UTF-8 text; save it as UTF-8")
    assert "iconv -f ENCODING" in message
