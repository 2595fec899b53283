"""DeepSpeed ZeRO-2 and ZeRO-3 on the CPU (two gloo processes) learn what one process learns.

Each multi-process run goes through `danlu train --nproc 2` (torchrun), as a user would. The
training tests skip where DeepSpeed is not installed (`pip install 'danlu[deepspeed]'`); the
refusals run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

from danlu import distributed, zero
from danlu.config import load_config
from danlu.errors import UserError
from danlu.train import check_strategy, train
from test_distributed import assert_resumes_the_same, assert_same_weights, losses, run_danlu, write_config

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed (danlu[deepspeed])"
)
# 9 records, global batch 4: in the third micro-batch of each epoch one process gets no sample
RECORDS = [
    {"instruction": f"What is {i} times {i}?", "input": "", "output": f"{i * i}, says Danlu" + "?" * i}
    for i in range(9)
]


@pytest.fixture
def data(tmp_path):
    from conftest import write_jsonl

    return write_jsonl(tmp_path / "d.jsonl", RECORDS)


def one_and_two(tmp_path, tiny_model_dir, data, strategy: str, save_every: int, **extra):
    """One process at batch 4 (in ``one/``), then two at batch 2 under ``strategy`` (in ``two/``,
    launched as a user would): returns the first's result, the second's folder and config."""
    one = train(
        load_config(write_config(tmp_path / "one.yaml", tiny_model_dir, data, tmp_path / "one", **extra)),
        progress=False,
    )
    out = tmp_path / "two"
    cfg = write_config(
        tmp_path / "two.yaml", tiny_model_dir, data, out,
        batch_size=2, strategy=strategy, save_every=save_every, **extra,
    )  # fmt: skip
    run_danlu("train", str(cfg), "--nproc", "2", "--no-progress")
    return one, out, cfg


def metric(out, name: str) -> dict[int, object]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in rows if name in r}


def samples(out) -> dict[int, list[dict]]:
    return metric(out, "samples")


@pytest.mark.slow
@needs_deepspeed
def test_zero2_lora_matches_one_process_and_resumes(tiny_model_dir, data, tmp_path):
    # a schedule that moves the rate at every step: the engine must use danlu's scheduler, and a
    # resume must restore it with the optimizer state
    extra = {"grad_accum": 2, "scheduler": "linear", "warmup_steps": 2}
    one, out, cfg = one_and_two(tmp_path, tiny_model_dir, data, "zero2", 3, **extra)

    a, b = losses(tmp_path / "one"), losses(out)
    assert sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    assert a[6] < a[1] - 0.5  # it learned, in both
    # the engine's gradient (before clipping) is one process's: nothing divided twice
    norms_one, norms_two = metric(tmp_path / "one", "grad_norm"), metric(out, "grad_norm")
    assert norms_two == pytest.approx(norms_one, rel=1e-3) and max(norms_one.values()) > 1.0
    assert_same_weights(one.adapter_dir, out / "final", "adapter_model.safetensors", 1e-4)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6  # rank 0 alone logged
    # the checkpoint: a chat-able adapter plus DeepSpeed's state, and no staging folder left over
    ckpt = out / "checkpoint-3"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "deepspeed" / "zero").is_dir()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []

    assert_resumes_the_same(cfg, out, b)

    # a DeepSpeed checkpoint does not turn into a DDP one
    proc = run_danlu(
        "train", str(cfg), "--nproc", "2", "--resume", "--no-progress", "train.strategy=ddp", check=False
    )
    assert proc.returncode == 2
    assert "written under train.strategy=zero2" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@needs_deepspeed
def test_zero3_full_tuning_matches_one_process_and_resumes(tiny_model_dir, data, tmp_path):
    extra = {"method": "full", "lr": 1e-3, "eval_prompts": ["What is 3 times 3?"]}
    one, out, cfg = one_and_two(tmp_path, tiny_model_dir, data, "zero3", 4, **extra)
    a, b = losses(tmp_path / "one"), losses(out)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    # the final model is whole (gathered from the partitions) and loads with plain transformers
    assert_same_weights(one.adapter_dir, out / "final", "model.safetensors", 1e-4)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")
    # every rank took part in generating (the weights are partitioned): the same answers as one
    assert samples(out) == samples(tmp_path / "one") and sorted(samples(out)) == [0, 6]

    # a checkpoint of the partitioned run resumes under ZeRO-3 to the same end
    (out / "final").rename(tmp_path / "first-final")
    run_danlu("train", str(cfg), "--nproc", "2", "--resume", "--no-progress")
    assert_same_weights(tmp_path / "first-final", out / "final", "model.safetensors", 1e-5)


@pytest.mark.gpu
@needs_deepspeed
def test_zero_on_one_gpu_computes_in_bf16_like_one_process(tiny_model_dir, data, tmp_path):
    """`--nproc 1` on CUDA (NCCL), optimizer state offloaded: the engine keeps the loop's bf16
    autocast (it turns an outer autocast off unless told), so ZeRO-2 repeats one process's losses
    and adapter, and ZeRO-3 starts from the same loss (a smoke run without it ended 0.017 off)."""
    extra = {"grad_accum": 2, "precision": "bf16", "fast": "off"}
    # one process in a process of its own too: run in pytest's, after other GPU tests, its step-2
    # loss came out 1e-4 (relative) off the same run in a fresh process (state left by an earlier
    # test, not found); fresh, AdamW fused, foreach or per tensor and ZeRO-2 with and without
    # optimizer offload agree to the last digit for 4 steps, then within 7e-5 (H100)
    run_danlu(
        "train",
        str(write_config(tmp_path / "one.yaml", tiny_model_dir, data, tmp_path / "one", **extra)),
        "--no-progress",
    )
    for strategy in ("zero2", "zero3"):
        cfg = write_config(
            tmp_path / f"{strategy}.yaml",
            tiny_model_dir,
            data,
            tmp_path / strategy,
            strategy=strategy,
            **extra,
        )
        run_danlu("train", str(cfg), "--nproc", "1", "--no-progress", "train.fsdp_offload=true")
    a, z2, z3 = (losses(tmp_path / name) for name in ("one", "zero2", "zero3"))
    for step in a:  # ZeRO-2 on one GPU is the same arithmetic
        assert z2[step] == pytest.approx(a[step], abs=1e-3), step
    assert z3[1] == pytest.approx(a[1], abs=1e-4)  # same weights, same bf16 forward
    assert z3[6] == pytest.approx(a[6], abs=0.05)  # later steps: reduction order may differ
    assert_same_weights(
        tmp_path / "one" / "final", tmp_path / "zero2" / "final", "adapter_model.safetensors", 1e-3
    )


# ---------------------------------------------------------------- refusals (fast, one process)


def test_zero_refusals(monkeypatch):
    zero2 = distributed.World(rank=0, size=2, strategy="zero2")
    zero3 = distributed.World(rank=0, size=2, strategy="zero3")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "deepspeed", None)  # as if not installed
        with pytest.raises(UserError, match=r"pip install 'danlu\[deepspeed\]'"):
            check_strategy(load_config(None), zero2, torch.float32)
    if importlib.util.find_spec("deepspeed") is None:
        return
    with pytest.raises(UserError, match="model.quantization=nf4 cannot be partitioned"):
        check_strategy(load_config(None, ["model.quantization=nf4"]), zero3, torch.bfloat16)
    with pytest.raises(UserError, match="train.precision=bf16"):
        check_strategy(load_config(None), zero2, torch.float16)
    with pytest.raises(UserError, match="train.optimizer=adamw_8bit is not supported"):
        check_strategy(load_config(None, ["train.optimizer=adamw_8bit"]), zero2, torch.float32)
    check_strategy(load_config(None), zero3, torch.bfloat16)  # fine


def test_without_deepspeed_nproc_stops_before_launching(tiny_model_dir, data, tmp_path, monkeypatch):
    (tmp_path / "site").mkdir()  # a sitecustomize that hides DeepSpeed from the danlu process
    (tmp_path / "site" / "sitecustomize.py").write_text('import sys; sys.modules["deepspeed"] = None\n')
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    )
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "run", strategy="zero3")
    proc = run_danlu("train", str(cfg), "--nproc", "2", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "danlu: error: train.strategy=zero3 needs DeepSpeed: pip install 'danlu[deepspeed]' "
        "(or use train.strategy=ddp or fsdp)"
    )
    assert not (tmp_path / "run").exists()


def test_zero_needs_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="train.strategy=zero3 needs several processes"):
        distributed.init("cpu", "zero3")


def test_ds_config_follows_danlus():
    cfg = load_config(
        None,
        ["train.batch_size=2", "train.grad_accum=3", "train.max_grad_norm=0.5", "train.fsdp_offload=true"],
    )
    c = zero.ds_config(cfg, 3)
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (2, 3)
    assert c["gradient_clipping"] == 0.5
    assert c["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    plain = zero.ds_config(load_config(None), 2)
    assert plain["zero_optimization"] == {"stage": 2} and "torch_autocast" not in plain
    # on a GPU the loop computes under autocast, which the engine's forward would otherwise turn off
    on_gpu = zero.ds_config(load_config(None), 2, torch.bfloat16)["torch_autocast"]
    assert on_gpu == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
