"""`danlu bench`: the flow on tiny shapes on the CPU (the real run is on the GPU, see README)."""

from __future__ import annotations

import json

import pytest
import torch

from danlu.app.cli import main


def test_bench_smoke_compares_both_paths_on_the_same_data(tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--steps", "3", "--cases", "lora-8b,varlen-8b", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    lora = report["cases"]["lora-8b"]
    names = [p["path"] for p in lora["paths"]]
    assert names[0].startswith("baseline") and names[-1].startswith("danlu fast")
    assert len(names) == 11  # baseline, the nine ablation rows, the full fast path
    settings = report["settings"]
    timed_rows = settings["batch"] * 3  # the full fast path and the baseline time every step
    for p in lora["paths"]:
        # tokens/s is the timed steps' tokens over their time
        assert len(p["step_s"]) == p["steps"] == 3 and all(t > 0 for t in p["step_s"])
        assert p["tokens"] == timed_rows * settings["seq"]
        assert p["tokens_per_s"] == pytest.approx(p["tokens"] / sum(p["step_s"]), rel=1e-9)
        assert 0 < p["mfu"] < 1
    first, last = lora["paths"][0], lora["paths"][-1]
    assert len(first["losses"]) == len(last["losses"]) == 3 + 3  # warmup + timed
    assert lora["loss_max_rel_diff"] < 1e-2  # same start, same batches: the same learning
    assert last["losses"][-1] < last["losses"][0]
    varlen = report["cases"]["varlen-8b"]
    base, ours = varlen["paths"][0], varlen["paths"][-1]
    assert base["tokens"] == ours["tokens"] > 0  # the same samples' real tokens, padded vs packed
    assert len(ours["losses"]) < len(base["losses"])  # packed: fewer, fuller steps
    assert "| lora-8b | baseline" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_without_a_gpu_says_so_in_one_line(capsys):
    assert main(["bench", "--cases", "lora-8b"]) == 2
    assert capsys.readouterr().err.strip() == (
        "danlu: error: danlu bench needs a CUDA GPU; --smoke runs tiny shapes on the CPU to check the flow"
    )


def test_bench_unknown_case_is_one_line(capsys):
    assert main(["bench", "--smoke", "--cases", "lora-70b"]) == 2
    assert "unknown case 'lora-70b'" in capsys.readouterr().err
