"""Several processes on the CPU (gloo): DDP and FSDP2 learn what one process learns.

Each multi-process run goes through `danlu train --nproc 2`, i.e. torchrun, as a user would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from danlu import distributed
from danlu.config import load_config
from danlu.data.render import IGNORE, Sample
from danlu.errors import UserError
from danlu.train import _shard, check_strategy, plan_steps, train

# 9 records, global batch 4: the third micro-batch of each epoch has one sample, so one of the
# two processes gets none and must still join the gradient sync
RECORDS = [
    {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{2 * i}, says Danlu" + "!" * i}
    for i in range(9)
]


def write_config(path, tiny_model_dir, data, out, **train):
    cfg = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"path": str(data)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "max_steps": 6,
            "batch_size": 4,
            "grad_accum": 1,
            "lr": 1e-2,
            "scheduler": "constant",
            "max_grad_norm": 1.0,
            **train,
        },
        "output": {"dir": str(out), "tensorboard": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_danlu(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "danlu", *args], env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_weights(a, b, name, atol):
    wa, wb = load_file(a / name), load_file(b / name)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=atol, rtol=0, msg=key)


def assert_resumes_the_same(cfg, out, before: dict[int, float]) -> None:
    """Resume ``cfg``'s two-process run from its step-3 checkpoint: steps 4-6 and the final
    adapter come out as the first time (``before``: that run's losses)."""
    first_adapter = load_file(out / "final" / "adapter_model.safetensors")
    run_danlu("train", str(cfg), "--nproc", "2", "--resume", "--no-progress")
    again = losses(out)
    assert sorted(again) == list(range(1, 7))
    for step in range(4, 7):
        assert again[step] == pytest.approx(before[step], abs=1e-5), step
    resumed = load_file(out / "final" / "adapter_model.safetensors")
    for key in first_adapter:
        torch.testing.assert_close(resumed[key], first_adapter[key], atol=1e-5, rtol=0)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", RECORDS)


@pytest.mark.slow
@pytest.mark.parametrize("fast", ["auto", "off"])
def test_ddp_two_processes_of_batch_2_match_one_of_batch_4(tiny_model_dir, data, tmp_path, fast):
    one = train(
        load_config(
            write_config(
                tmp_path / "one.yaml", tiny_model_dir, data, tmp_path / "one", grad_accum=2, fast=fast
            )
        ),
        progress=False,
    )
    cfg = write_config(
        tmp_path / "two.yaml", tiny_model_dir, data, tmp_path / "two", batch_size=2, grad_accum=2, fast=fast
    )
    proc = run_danlu("train", str(cfg), "--nproc", "2", "--no-progress")
    # under DDP too, auto takes the fast path (its loss inside DDP's forward), off the plain one
    said = "fast path: padding-free decoder" in proc.stdout + proc.stderr
    assert said == (fast == "auto")

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    assert a[6] < a[1] - 0.5  # it learned, in both
    assert_same_weights(one.adapter_dir, tmp_path / "two" / "final", "adapter_model.safetensors", 1e-4)
    # only rank 0 wrote: one metrics line per step, one final adapter folder that peft loads
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 6
    assert (tmp_path / "two" / "final" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_ddp_checkpoint_and_resume(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, out, batch_size=2, save_every=3)
    run_danlu("train", str(cfg), "--nproc", "2", "--no-progress")
    first = losses(out)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]

    # one process cannot continue a two-process run: the global batch would change
    with pytest.raises(UserError, match="written by 2 processes"):
        train(load_config(cfg), resume=True, progress=False)

    assert_resumes_the_same(cfg, out, first)


@pytest.mark.slow
def test_fsdp_full_tuning_matches_one_process(tiny_model_dir, data, tmp_path):
    extra = {"method": "full", "lr": 1e-3}
    one = train(
        load_config(write_config(tmp_path / "one.yaml", tiny_model_dir, data, tmp_path / "one", **extra)),
        progress=False,
    )
    cfg = write_config(
        tmp_path / "two.yaml",
        tiny_model_dir,
        data,
        tmp_path / "two",
        batch_size=2,
        strategy="fsdp",
        save_every=4,
        **extra,
    )
    run_danlu("train", str(cfg), "--nproc", "2", "--no-progress")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    # the final model is whole (gathered from the shards) and loads with plain transformers
    assert_same_weights(one.adapter_dir, tmp_path / "two" / "final", "model.safetensors", 1e-4)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    # a checkpoint of the sharded run resumes under FSDP2 to the same end
    (tmp_path / "two" / "final").rename(tmp_path / "first-final")
    run_danlu("train", str(cfg), "--nproc", "2", "--resume", "--no-progress")
    assert_same_weights(tmp_path / "first-final", tmp_path / "two" / "final", "model.safetensors", 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        "fsdp",
        pytest.param(
            "zero3",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("deepspeed") is None,
                reason="DeepSpeed not installed (danlu[deepspeed])",
            ),
        ),
    ],
)
def test_sharded_lora_matches_one_process(tiny_model_dir, data, tmp_path, strategy):
    one = train(
        load_config(write_config(tmp_path / "one.yaml", tiny_model_dir, data, tmp_path / "one")),
        progress=False,
    )
    cfg = write_config(
        tmp_path / "two.yaml", tiny_model_dir, data, tmp_path / "two", batch_size=2, strategy=strategy
    )
    run_danlu("train", str(cfg), "--nproc", "2", "--no-progress")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    assert_same_weights(one.adapter_dir, tmp_path / "two" / "final", "adapter_model.safetensors", 1e-4)


@pytest.mark.slow
def test_a_bad_config_fails_before_launching(tiny_model_dir, data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "run")
    proc = run_danlu("train", str(cfg), "--nproc", "2", "train.stratgey=ddp", check=False)
    assert proc.returncode == 2
    assert "train.stratgey" in proc.stderr and "strategy" in proc.stderr
    assert "torch.distributed" not in proc.stderr  # no launcher started
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- single-process units (fast)


@pytest.mark.parametrize(("rank", "expected"), [(0, [0, 1]), (1, [2])])
def test_shard_splits_a_global_batch_in_consecutive_slices(rank, expected):
    batch = [Sample([i, i], [i, i]) for i in range(3)]
    part = _shard(batch, distributed.World(rank=rank, size=2, strategy="ddp"))
    assert [s.input_ids[0] for s in part] == expected


def test_shard_gives_an_empty_rank_a_fully_masked_sample():
    batch = [Sample([5, 6, 7], [IGNORE, 6, 7])]
    (part,) = _shard(batch, distributed.World(rank=1, size=2, strategy="ddp"))
    assert part.input_ids == [5, 6, 7] and part.labels == [IGNORE] * 3
    assert batch[0].labels == [IGNORE, 6, 7]  # the original is untouched


def test_plan_steps_counts_the_global_batch():
    cfg = load_config(None, ["train.batch_size=2", "train.epochs=1"])
    assert plan_steps(16, cfg, processes=1) == 8
    assert plan_steps(16, cfg, processes=4) == 2


def test_strategy_refusals(monkeypatch):
    fsdp = distributed.World(rank=0, size=2, strategy="fsdp")
    with pytest.raises(UserError, match="model.quantization=nf4 cannot be sharded"):
        check_strategy(load_config(None, ["model.quantization=nf4"]), fsdp, torch.float32)
    with pytest.raises(UserError, match="train.precision=bf16"):
        check_strategy(load_config(None), fsdp, torch.float16)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="needs several processes"):
        distributed.init("cpu", "fsdp")
    assert not distributed.init("cpu", "auto").active
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="drop --nproc"):
        distributed.launch(2, ["train", "x.yaml"])


@pytest.mark.slow
def test_a_data_error_under_nproc_is_one_line_and_exit_2(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "hi"}])
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, bad, tmp_path / "run")
    proc = run_danlu("train", str(cfg), "--nproc", "2", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("danlu: error:")]
    assert len(errors) == 1 and "bad.jsonl:1" in errors[0] and "output" in errors[0]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert not (tmp_path / "run").exists()
