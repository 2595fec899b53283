"""CUDA paths: bf16/fp16 training, QLoRA on the GPU, packing under CUDA attention, full tuning.

Marked ``gpu``: skipped without CUDA, run on the device machine; results are committed as
``benchmarks/results/gpu_tests.json`` (see README, Development).
"""

from __future__ import annotations

import pytest
import torch

from conftest import write_jsonl
from danlu.config import load_config
from danlu.data.dataset import collate
from danlu.data.packing import pack
from danlu.data.render import IGNORE, render
from danlu.train import forward, token_loss_sum, train

pytestmark = pytest.mark.gpu
RECORDS = [
    {"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}, says Danlu."} for i in range(8)
]


def run(tiny_model_dir, tmp_path, *extra):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.path={data}",
            "data.cache=false",
            f"output.dir={tmp_path / 'run'}",
            "output.tensorboard=false",
            "lora.r=8",
            "lora.alpha=16",
            "lora.dropout=0",
            "train.batch_size=8",
            "train.scheduler=constant",
            "train.max_steps=15",
            "train.lr=5e-2",
            *extra,
        ],
    )
    return train(cfg, progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_lora_trains_on_cuda(tiny_model_dir, tmp_path, precision):
    result = run(tiny_model_dir, tmp_path, f"train.precision={precision}")
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < 0.8 * result.losses[0]


def test_qlora_nf4_trains_on_cuda(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = run(tiny_model_dir, tmp_path, "model.quantization=nf4", "train.gradient_checkpointing=true")
    assert result.losses[-1] < 0.8 * result.losses[0]


def test_full_fine_tuning_on_cuda(tiny_model_dir, tmp_path):
    result = run(tiny_model_dir, tmp_path, "train.method=full", "train.lr=1e-3", "train.optimizer=adamw")
    assert result.losses[-1] < result.losses[0]


def test_packed_loss_equals_unpacked_on_cuda_sdpa(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    chats = [
        [
            {"role": "user", "content": f"Q{i} " + "why " * i},
            {"role": "assistant", "content": "so " * (i + 3)},
        ]
        for i in range(10)
    ]
    samples = [render(tokenizer, c, 512, {tokenizer.eos_token_id}) for c in chats]
    with torch.no_grad():
        padded = {k: v.cuda() for k, v in collate(samples, tokenizer.pad_token_id).items()}
        packed = {k: v.cuda() for k, v in collate(pack(samples, 200), tokenizer.pad_token_id).items()}
        a = (
            token_loss_sum(forward(model, padded), padded["labels"])
            / (padded["labels"][:, 1:] != IGNORE).sum()
        )
        b = (
            token_loss_sum(forward(model, packed), packed["labels"])
            / (packed["labels"][:, 1:] != IGNORE).sum()
        )
    assert abs(float(a) - float(b)) < 1e-4
