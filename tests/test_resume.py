"""Exact resume: a run killed with SIGKILL and resumed matches an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from danlu.checkpoint import all_checkpoints
from danlu.config import load_config
from danlu.errors import UserError
from danlu.train import train

RECORDS = [
    {"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}, says Danlu."} for i in range(7)
]


def write_config(path, tiny_model_dir, data, out, steps=60):
    cfg = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"path": str(data), "cache": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG state must be restored too
        "train": {
            "max_steps": steps,
            "batch_size": 2,
            "grad_accum": 2,
            "lr": 1e-2,
            "scheduler": "cosine",
            "warmup_steps": 2,
            "save_every": 2,
            "save_total_limit": 3,
        },
        "output": {"dir": str(out), "tensorboard": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_killed_and_resumed_run_matches_uninterrupted(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    straight = train(
        load_config(write_config(tmp_path / "a.yaml", tiny_model_dir, data, tmp_path / "a")), progress=False
    )

    cfg_path = write_config(tmp_path / "b.yaml", tiny_model_dir, data, tmp_path / "b")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "danlu", "train", str(cfg_path), "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not all_checkpoints(tmp_path / "b") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # let it run on past the checkpoint, as a crash would
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "final").exists(), "the run finished before it could be killed"
    killed_at = int(all_checkpoints(tmp_path / "b")[-1].name.split("-")[1])
    assert 0 < killed_at < 60

    resumed = train(load_config(cfg_path), resume=True, progress=False)
    assert len(resumed.losses) == 60 - killed_at
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 61))  # entries the killed run wrote past its checkpoint were dropped
    for step in range(1, 61):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    wa = load_file(straight.adapter_dir / "adapter_model.safetensors")
    wb = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=0)


def test_resume_refuses_a_changed_config_or_a_missing_checkpoint(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    cfg = load_config(write_config(tmp_path / "a.yaml", tiny_model_dir, data, tmp_path / "a", steps=4))
    with pytest.raises(UserError, match="holds no danlu run"):
        train(cfg, resume=True, progress=False)
    train(cfg, progress=False)
    changed = load_config(tmp_path / "a.yaml", ["train.lr=1e-3"])
    with pytest.raises(UserError, match="differs from the run's in train.lr"):
        train(changed, resume=True, progress=False)
    cfg.train.save_every = 0
    train(
        load_config(tmp_path / "a.yaml", ["train.save_every=0", f"output.dir={tmp_path / 'c'}"]),
        progress=False,
    )
    with pytest.raises(UserError, match="no checkpoint yet"):
        train(
            load_config(tmp_path / "a.yaml", ["train.save_every=0", f"output.dir={tmp_path / 'c'}"]),
            resume=True,
            progress=False,
        )
