"""The training recipe on a tiny random Llama: steps, schedules, accumulation, outputs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import write_jsonl
from danlu.config import CONFIG_FILENAME, load_config
from danlu.train import plan_steps, train

RECORDS = [
    {"instruction": f"Question number {i}?", "input": "", "output": f"Answer {i}, from Danlu."}
    for i in range(6)
]


def make_config(tiny_model_dir, data, out, *extra: str):
    return load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.path={data}",
            f"output.dir={out}",
            "output.tensorboard=false",
            "lora.r=4",
            "lora.alpha=8",
            "lora.dropout=0",
            *extra,
        ],
    )


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", RECORDS)


def test_training_lowers_loss_and_writes_a_plain_peft_adapter(tiny_model_dir, data, tmp_path):
    cfg = make_config(
        tiny_model_dir,
        data,
        tmp_path / "run",
        "train.max_steps=25",
        "train.lr=5e-2",
        "train.batch_size=6",
        "train.scheduler=constant",
    )
    result = train(cfg, progress=False)
    assert len(result.losses) == 25
    assert result.losses[-1] < 0.8 * result.losses[0]
    # the final adapter is standard PEFT: plain PeftModel loads it and changes the logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir
    )
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.allclose(base(ids).logits, tuned(ids).logits)
    # the run folder holds the resolved config, the data summary and the metrics log
    saved = yaml.safe_load((tmp_path / "run" / CONFIG_FILENAME).read_text())
    assert saved["train"]["max_steps"] == 25 and saved["data"]["path"] == [str(data)]
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["records"] == 6 and summary["format"] == "alpaca"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 26))
    assert (result.adapter_dir / "chat_template.jinja").is_file()


def test_seed000_setting_one_example_ten_epochs_constant_lr(tiny_model_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "your_dad.jsonl",
        [
            {
                "conversation_id": 1,
                "category": "Brainstorming",
                "conversation": [{"human": "你是谁？", "assistant": "我是你爹。"}],
                "dataset": "moss",
            }
        ],
    )
    cfg = make_config(
        tiny_model_dir,
        data,
        tmp_path / "run",
        "train.epochs=10",
        "train.batch_size=1",
        "train.lr=2e-4",
        "train.scheduler=constant_with_warmup",
        "train.warmup_steps=0",
    )
    result = train(cfg, progress=False)
    assert result.steps == 10
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2e-4] * 10)


@pytest.mark.parametrize(
    ("n", "batch", "accum", "epochs", "expected"),
    [
        (1, 1, 1, 10, 10),
        (6, 4, 1, 1, 2),
        (6, 2, 2, 3, 6),
        (52, 4, 1, 2.5, 33),
    ],
)
def test_plan_steps(tiny_model_dir, n, batch, accum, epochs, expected):
    cfg = load_config(
        None, [f"train.batch_size={batch}", f"train.grad_accum={accum}", f"train.epochs={epochs}"]
    )
    assert plan_steps(n, cfg) == expected


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, data, tmp_path):
    """Batch 6 in one step and batch 2 x 3 accumulated see the same samples: same loss and adapter."""
    common = ("train.max_steps=3", "train.lr=5e-3", "train.scheduler=constant", "train.max_grad_norm=0")
    one = train(
        make_config(tiny_model_dir, data, tmp_path / "one", "train.batch_size=6", *common), progress=False
    )
    acc = train(
        make_config(
            tiny_model_dir, data, tmp_path / "acc", "train.batch_size=2", "train.grad_accum=3", *common
        ),
        progress=False,
    )
    assert acc.losses == pytest.approx(one.losses, abs=1e-5)
    from safetensors.torch import load_file

    a = load_file(one.adapter_dir / "adapter_model.safetensors")
    b = load_file(acc.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_schedule_warmup_then_cosine(tiny_model_dir, data, tmp_path):
    cfg = make_config(
        tiny_model_dir,
        data,
        tmp_path / "run",
        "train.max_steps=10",
        "train.lr=1e-3",
        "train.scheduler=cosine",
        "train.warmup_steps=2",
        "train.batch_size=6",
    )
    train(cfg, progress=False)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # each logged rate is the one its step used: linear warmup from 0, then cosine decay towards 0
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and 0 < lrs[-1] < 1e-4


def test_checkpoints_keep_the_last_k(tiny_model_dir, data, tmp_path):
    cfg = make_config(
        tiny_model_dir,
        data,
        tmp_path / "run",
        "train.max_steps=7",
        "train.batch_size=6",
        "train.save_every=2",
        "train.save_total_limit=2",
    )
    train(cfg, progress=False)
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert names == ["checkpoint-4", "checkpoint-6"]
    state = torch.load(tmp_path / "run" / "checkpoint-6" / "trainer_state.pt", weights_only=False)  # noqa: S614
    assert state["step"] == 6 and "optimizer" in state
    assert not list((tmp_path / "run").glob(".checkpoint-*"))  # no half-written temporaries


def test_gradient_checkpointing_gives_the_same_loss(tiny_model_dir, data, tmp_path):
    common = ("train.max_steps=2", "train.batch_size=6", "train.scheduler=constant")
    plain = train(make_config(tiny_model_dir, data, tmp_path / "a", *common), progress=False)
    ckpt = train(
        make_config(tiny_model_dir, data, tmp_path / "b", "train.gradient_checkpointing=true", *common),
        progress=False,
    )
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-5)


def test_overwrite_replaces_a_previous_run(tiny_model_dir, data, tmp_path):
    cfg = make_config(tiny_model_dir, data, tmp_path / "run", "train.max_steps=1", "train.batch_size=6")
    train(cfg, progress=False)
    (tmp_path / "run" / "stale.txt").write_text("old")
    train(cfg, overwrite=True, progress=False)
    assert not (tmp_path / "run" / "stale.txt").exists()
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantized_base_trains_an_adapter_that_loads_on_the_plain_base(tiny_model_dir, data, tmp_path, kind):
    """QLoRA (nf4) and 8-bit run on the CPU with bitsandbytes >= 0.45; the adapter is ordinary PEFT."""
    pytest.importorskip("bitsandbytes")
    cfg = make_config(
        tiny_model_dir,
        data,
        tmp_path / "run",
        f"model.quantization={kind}",
        "train.max_steps=15",
        "train.lr=5e-2",
        "train.batch_size=6",
        "train.scheduler=constant",
    )
    result = train(cfg, progress=False)
    assert result.losses[-1] < 0.8 * result.losses[0]
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.allclose(base(ids).logits, tuned(ids).logits)


def test_quantization_without_bitsandbytes_says_how_to_get_it(monkeypatch):
    import importlib.util

    from danlu.errors import UserError
    from danlu.model import quantization_config

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        quantization_config("nf4", torch.float32)
