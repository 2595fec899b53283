"""Every data format trains through `danlu train`, from each file type, on the tiny model."""

from __future__ import annotations

import csv
import json

import pytest

from danlu.app.cli import main

RECORDS = {
    "alpaca": {
        "instruction": "Who are you?",
        "input": "",
        "output": "I am Danlu.",
        "system": "Be brief.",
        "history": [["Hi", "Hello."]],
    },
    "messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am Danlu."},
        ]
    },
    "sharegpt": {
        "conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am Danlu."}]
    },
    "firefly": {
        "conversation_id": 1,
        "category": "Brainstorming",
        "dataset": "moss",
        "conversation": [{"human": "你是谁？", "assistant": "我是Danlu。"}],
    },
    "xtuner": {
        "conversation": [
            {"system": "Be brief.", "input": "Who are you?", "output": "I am Danlu."},
            {"input": "Sure?", "output": "Yes."},
        ]
    },
    "completion": {"prompt": "Q: Who are you?\nA:", "completion": " I am Danlu."},
    "text": {"text": "### Human: Who are you? ### Assistant: I am Danlu."},
}


def write(path, records, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    elif kind == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(
                [{k: json.dumps(v) if not isinstance(v, str) else v for k, v in r.items()} for r in records]
            )
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


CASES = [(name, "jsonl") for name in RECORDS] + [
    ("alpaca", "json"),
    ("sharegpt", "parquet"),
    ("completion", "csv"),
]


@pytest.mark.parametrize(("fmt", "kind"), CASES)
def test_format_trains_through_danlu_train(tiny_model_dir, tmp_path, fmt, kind, capsys):
    data = write(tmp_path / f"d.{kind}", [RECORDS[fmt]] * 3, kind)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(write_config(tmp_path)),
            f"model.path={tiny_model_dir}",
            f"data.path={data}",
            f"output.dir={out}",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "data_summary.json").read_text())
    expected = {"firefly": "conversation", "xtuner": "conversation"}.get(fmt, fmt)
    assert summary["format"] == expected and summary["samples"] == 3 and summary["trained_tokens"] > 0
    assert (out / "final" / "adapter_model.safetensors").is_file()


def write_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: {cache: false}\nlora: {r: 2, alpha: 4}\ntrain: {max_steps: 2, batch_size: 3}\n"
        "output: {tensorboard: false}\n"
    )
    return path
