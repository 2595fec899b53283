"""The fast path's chunked loss gives the plain path's loss and gradients, without the full logits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import write_jsonl
from danlu.config import load_config
from danlu.data.dataset import collate
from danlu.data.packing import pack
from danlu.data.render import IGNORE, render
from danlu.fast import ALL, LOSS_ONLY
from danlu.fast import loss as fast
from danlu.train import forward, token_loss_sum, train


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused-chunk"])
def test_chunked_cross_entropy_matches_the_full_one(monkeypatch, fused):
    monkeypatch.setattr(fast, "CHUNK", 7)  # several chunks and a short last one
    if fused:  # the GPU's compiled chunk step, run eagerly here: the same function, uncompiled
        monkeypatch.setattr(fast.kernels, "can_compile", lambda device: True)
        monkeypatch.setattr(fast, "_fused_chunk", lambda logits, t: calls.append(1) or fast._chunk(logits, t))
    calls = []
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    ours = fast.chunked_cross_entropy(hidden, weight, targets)
    ours.backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    full.backward()
    torch.testing.assert_close(ours, full)
    torch.testing.assert_close(g_hidden, hidden.grad)
    torch.testing.assert_close(g_weight, weight.grad)
    assert len(calls) == (5 if fused else 0)  # 30 positions in chunks of 7


def test_the_fused_chunk_keeps_fp32_arithmetic_for_bf16_logits():
    torch.manual_seed(0)
    logits = (torch.randn(6, 40) * 4).bfloat16()
    targets = torch.randint(0, 40, (6,))
    loss, grad = fast._chunk(logits, targets)
    want = F.cross_entropy(logits.float(), targets, reduction="sum")
    torch.testing.assert_close(loss, want)
    assert grad.dtype == torch.bfloat16
    want_grad = torch.softmax(logits.float(), -1) - F.one_hot(targets, 40).float()
    torch.testing.assert_close(grad.float(), want_grad, rtol=1e-2, atol=4e-3)


@pytest.mark.parametrize("options", [LOSS_ONLY, ALL], ids=["hf-decoder", "padding-free-decoder"])
@pytest.mark.parametrize("packed", [False, True])
def test_model_loss_and_adapter_gradients_match_the_plain_path(
    tiny_model_dir, tokenizer, monkeypatch, packed, options
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(fast, "CHUNK", 16)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    chats = [
        [
            {"role": "user", "content": f"Q{i} " + "why " * i},
            {"role": "assistant", "content": "so " * (i + 3)},
        ]
        for i in range(6)
    ]
    samples = [render(tokenizer, c, 512, {tokenizer.eos_token_id}) for c in chats]
    batch = collate(pack(samples, 200) if packed else samples, tokenizer.pad_token_id)
    assert fast.supports(model)

    plain = token_loss_sum(forward(model, batch), batch["labels"])
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    chunked = fast.loss_sum(model, batch, options)
    chunked.backward()
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) > 16  # more than one chunk
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        if p.requires_grad:
            # fp32 sums in another order: compare each gradient as a whole
            error = (p.grad - plain_grads[name]).norm() / plain_grads[name].norm()
            assert error < 1e-4, (name, float(error))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_with_and_without_the_fast_path_is_the_same(tiny_model_dir, tmp_path, method):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": f"Q{i}?", "input": "", "output": f"Answer {i}, says Danlu."} for i in range(6)],
    )
    losses = {}
    for mode in ("auto", "off"):
        cfg = load_config(
            None,
            [
                f"model.path={tiny_model_dir}",
                f"data.path={data}",
                f"output.dir={tmp_path / mode}",
                f"train.method={method}",
                "output.tensorboard=false",
                "train.max_steps=8",
                "train.batch_size=3",
                "train.lr=1e-2" if method == "lora" else "train.lr=1e-3",
                "lora.dropout=0",
                f"train.fast={mode}",
            ],
        )
        train(cfg, progress=False)
        rows = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        losses[mode] = [json.loads(r)["loss"] for r in rows if "loss" in json.loads(r)]
    assert losses["auto"] == pytest.approx(losses["off"], rel=2e-5)  # fp32, summed in another order
    assert losses["auto"][-1] < losses["auto"][0]


def test_models_the_chunked_loss_cannot_serve_are_recognised(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert fast.supports(model)
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits are transformed after the head
    assert not fast.supports(model)


def test_a_bare_off_in_yaml_switches_it_off(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  fast: off\n")  # YAML 1.1 reads this as false
    assert load_config(path).train.fast == "off"
    assert load_config(None).train.fast == "auto"
