"""A pair's prompt run once, on CUDA: the flash kernel's shared-prefix attention against the masked
one, and the compiled bf16 path's log-probs and LoRA gradients against the two whole rows."""

from __future__ import annotations

import pytest
import torch

from danlu.fast import pairs, varlen
from test_pairs import LENGTHS, pair_batch, shared

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("window", [None, 48])
def test_flash_attention_over_a_shared_prefix_equals_the_masked_attention_on_cuda(window):
    """Queries that are the last keys of their sequence (bottom-right causal), through flash varlen
    attention in bf16, against SDPA with an explicit mask one sequence at a time in fp32."""
    torch.manual_seed(0)
    heads, kv, d = 8, 2, 64
    prompt, chosen, rejected = 150, 90, 120
    total = prompt + chosen + rejected
    own = torch.arange(prompt + chosen)
    keys = torch.cat([own, own[:prompt], torch.arange(prompt + chosen, total)]).cuda()
    flat = varlen.Flat(
        torch.zeros(total, dtype=torch.long, device="cuda"), None, None,
        torch.tensor([0, prompt + chosen, total], dtype=torch.int32, device="cuda"), prompt + chosen,
        keys=keys, cu_keys=torch.tensor([0, prompt + chosen, 2 * prompt + chosen + rejected], dtype=torch.int32,
                                        device="cuda"),
        max_keys=max(prompt + chosen, prompt + rejected),
    )  # fmt: skip
    q, k, v = (torch.randn(total, h, d, device="cuda") for h in (heads, kv, kv))
    grad = torch.randn(total, heads, d, device="cuda")

    def run(dtype, on_cuda_kernel):
        q_, k_, v_ = (t.to(dtype).requires_grad_() for t in (q, k, v))
        if on_cuda_kernel:
            out = varlen.attention(q_, k_, v_, flat, d**-0.5, window=window)
        else:  # the CPU path's loop (masks), run on the GPU's tensors
            cpu = [t.cpu().requires_grad_() for t in (q_.detach(), k_.detach(), v_.detach())]
            cpu_flat = varlen.Flat(None, None, None, flat.cu_seqlens.cpu(), flat.max_len, keys=keys.cpu(),
                                   cu_keys=flat.cu_keys.cpu(), max_keys=flat.max_keys)  # fmt: skip
            out = varlen.attention(*cpu, cpu_flat, d**-0.5, window=window)
            out.backward(grad.cpu().to(dtype))
            return [t.float() for t in (out, *(c.grad for c in cpu))]
        out.backward(grad.to(dtype))
        return [t.float().cpu() for t in (out, q_.grad, k_.grad, v_.grad)]

    for ours, want in zip(run(torch.bfloat16, True), run(torch.float32, False), strict=True):
        assert float((ours - want).norm() / want.norm()) < 1e-2


def test_equal_length_pairs_take_the_dense_attention_and_equal_the_masked_one_on_cuda(monkeypatch):
    """Pairs whose sequences all have as many keys go through :func:`varlen.dense_shared` (cuDNN's
    causal kernel over the gathered rows) in bf16: the same outputs and gradients as the masked
    attention in fp32, as close as the variable-length flash kernel gets."""
    torch.manual_seed(0)
    heads, kv, d = 8, 2, 64
    lengths = [(150, 90, 90), (60, 180, 180)]  # every row 240 tokens
    batch = shared(pair_batch(lengths=lengths), lengths)
    flat = pairs.flatten({k: v.cuda() for k, v in batch.items()})[0]
    cpu_flat = pairs.flatten(batch)[0]
    calls = []
    dense_shared = varlen.dense_shared
    monkeypatch.setattr(varlen, "dense_shared", lambda *a: calls.append(1) or dense_shared(*a))
    total = flat.input_ids.numel()
    q, k, v = (torch.randn(total, h, d) for h in (heads, kv, kv))
    grad = torch.randn(total, heads, d)

    def run(device, dtype, dense):
        q_, k_, v_ = (t.detach().to(device, dtype).requires_grad_() for t in (q, k, v))
        out = varlen.attention(q_, k_, v_, flat if device == "cuda" else cpu_flat, d**-0.5, dense=dense)
        out.backward(grad.to(device, dtype))
        return [t.float().cpu() for t in (out, q_.grad, k_.grad, v_.grad)]

    want = run("cpu", torch.float32, True)
    varlen_kernel = run("cuda", torch.bfloat16, False)
    assert not calls
    dense = run("cuda", torch.bfloat16, True)
    assert len(calls) == 1
    for name, ours, flash, w in zip(("out", "dq", "dk", "dv"), dense, varlen_kernel, want, strict=True):
        flash_err = float((flash - w).norm() / w.norm())
        err = float((ours - w).norm() / w.norm())
        assert err <= 2 * flash_err + 1e-3, f"{name}: dense {err:.2e}, variable-length {flash_err:.2e}"


def test_compiled_shared_prompt_pairs_equal_whole_rows_in_bf16_on_cuda():
    """The whole fast path (compiled layers, kept attention halves in CPU memory, bf16): log-probs and
    LoRA gradients with the prompt shared are as close to an fp32 whole-row reference as the whole
    rows in bf16 are."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from danlu.fast import ALL
    from danlu.fast.loss import sequence_logps

    config = AutoConfig.for_model(
        "llama", vocab_size=120, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    weights = torch.linspace(-1.0, 2.0, 2 * len(LENGTHS), device="cuda")

    def run(dtype, batch, options):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config).to("cuda", dtype)
        base.gradient_checkpointing_enable({"use_reentrant": False})
        torch.manual_seed(1)
        model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
        model.train()
        b = {k: v.cuda() for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            sums, _ = sequence_logps(model, b, options)
        (sums * weights).sum().backward()
        return sums.detach().float(), {
            n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad
        }

    batch = pair_batch()
    ref_sums, ref = run(torch.float32, batch, None)
    whole_sums, whole = run(torch.bfloat16, batch, ALL)
    ours_sums, ours = run(torch.bfloat16, shared(batch), ALL)
    whole_err = float((whole_sums - ref_sums).norm() / ref_sums.norm())
    assert float((ours_sums - ref_sums).norm() / ref_sums.norm()) <= 2 * whole_err + 1e-3
    for name, g in ref.items():
        whole_err = float((whole[name] - g).norm() / g.norm())
        assert float((ours[name] - g).norm() / g.norm()) <= 2 * whole_err + 1e-2, name
