"""The padding-free decoder: same loss and gradients as transformers' forward, sequences kept apart."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from danlu.data.render import IGNORE
from danlu.fast import ALL, LOSS_ONLY, decoder, varlen
from danlu.fast import loss as fast
from danlu.train import forward, token_loss_sum


def small(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=120,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 120, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE  # a prompt
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_flatten_keeps_only_real_tokens_and_never_targets_across_sequences():
    batch = padded_batch()
    flat = varlen.flatten(batch)
    assert flat.cu_seqlens.tolist() == [0, 24, 39, 45]
    assert flat.max_len == 24 and flat.cu_seqlens.dtype == torch.int32
    assert flat.position_ids[24:39].tolist() == list(range(15))
    assert flat.input_ids[39:].tolist() == batch["input_ids"][2, :6].tolist()
    # targets are the next token of the same sequence; the last token of each has none
    assert flat.targets[:23].tolist() == batch["labels"][0, 1:].tolist()
    assert flat.targets[[23, 38, 44]].tolist() == [IGNORE] * 3
    # packed rows: sequences start where the position ids restart (padding tail becomes its own)
    packed = {
        "input_ids": torch.arange(10).unsqueeze(0),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]]),
        "labels": torch.tensor([[IGNORE, 1, 2, IGNORE, 4, 5, 6, IGNORE, IGNORE, IGNORE]]),
    }
    flat = varlen.flatten(packed)
    assert flat.cu_seqlens.tolist() == [0, 3, 7, 10]
    assert flat.targets.tolist() == [1, 2, IGNORE, 4, 5, 6, IGNORE, IGNORE, IGNORE, IGNORE]


def test_equal_length_sequences_are_recognised_without_reading_the_gpu():
    def flat(lengths):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return varlen.Flat(None, None, None, cu, max(lengths))

    assert varlen.uniform(flat([4, 4, 4]), 12)
    assert not varlen.uniform(flat([4, 3, 4]), 11)
    assert not varlen.uniform(flat([5, 1, 6]), 12)  # same total, different lengths
    batch = {"input_ids": torch.ones(2, 6, dtype=torch.long), "attention_mask": torch.ones(2, 6)}
    batch["labels"] = batch["input_ids"].clone()
    assert varlen.uniform(varlen.flatten(batch), 12)
    batch["attention_mask"][1, 4:] = 0
    assert not varlen.uniform(varlen.flatten(batch), 10)


def test_attention_stays_within_each_sequence():
    torch.manual_seed(0)
    lengths = [5, 1, 9]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    q, k, v = torch.randn(15, 4, 8), torch.randn(15, 2, 8), torch.randn(15, 2, 8)
    flat = varlen.Flat(torch.zeros(15, dtype=torch.long), torch.zeros(15, dtype=torch.long), None, cu, 9)
    out = varlen.attention(q, k, v, flat, 0.3)
    # reference: one block-diagonal causal mask over the whole row
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(15, 15, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=allowed, scale=0.3,
    ).transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(out, ref)


GEMMA3 = {  # local then global layer, their own rotary (the global one scaled, as Gemma-3 4B's)
    "head_dim": 16,
    "query_pre_attn_scalar": 24,  # the attention's scale is not head_dim's
    "sliding_window": 5,
    "layer_types": ["sliding_attention", "full_attention"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    },
}

# sliding windows shorter than the batch's sequences (24, 15 and 6 tokens): the window matters
SHAPES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "phi3": ("phi3", {"pad_token_id": 0}),
    "mistral-window": ("mistral", {"sliding_window": 5}),
    "phi3-window": ("phi3", {"pad_token_id": 0, "sliding_window": 7}),
    "qwen2-window-layer-1": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    "gemma3": ("gemma3_text", GEMMA3),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_lora_gradients_equal_transformers_forward(shape, checkpointing):
    from peft import LoraConfig, get_peft_model

    model_type, extra = SHAPES[shape]
    base = small(model_type, **extra)
    assert decoder.supports(base)
    with torch.no_grad():  # Gemma's norms start at zero (a scale of 1 + weight): make every norm count
        for name, p in base.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    if checkpointing:
        base.gradient_checkpointing_enable({"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    calls = []
    attn = model.base_model.model.model.layers[0].self_attn
    (attn.q_proj if hasattr(attn, "q_proj") else attn.qkv_proj).base_layer.register_forward_pre_hook(
        lambda *a: calls.append(1)
    )
    batch = padded_batch()
    plain = token_loss_sum(forward(model, batch), batch["labels"])
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    calls.clear()
    ours = fast.loss_sum(model, batch, ALL)
    ours.backward()
    # with checkpointing each layer runs again in the backward: proof the flag is followed
    assert len(calls) == (2 if checkpointing else 1)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        if p.requires_grad:
            error = (p.grad - want[name]).norm() / want[name].norm()
            assert error < 1e-4, (name, float(error))


def test_windows_are_applied_where_a_layer_has_one():
    qwen2 = small("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    windows = [decoder.sliding_window(layer.self_attn) for layer in qwen2.model.layers]
    assert windows == [None, 4]  # transformers' own per-layer choice, read rather than guessed
    assert decoder.sliding_window(small("mistral", sliding_window=5).model.layers[0].self_attn) == 5
    # the same sequences with and without a window: a window shorter than them changes the output
    torch.manual_seed(2)
    q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    flat = varlen.Flat(torch.zeros(12, dtype=torch.long), torch.cat([torch.arange(9), torch.arange(3)]),
                       torch.zeros(12, dtype=torch.long), torch.tensor([0, 9, 12], dtype=torch.int32), 9)  # fmt: skip
    full = varlen.attention(q, k, v, flat, 0.3)
    banded = varlen.attention(q, k, v, flat, 0.3, window=3)
    torch.testing.assert_close(varlen.attention(q, k, v, flat, 0.3, window=9), full)  # no sequence longer
    assert torch.equal(banded[:3], full[:3]) and torch.equal(banded[9:], full[9:])  # within the window
    assert not torch.allclose(banded[3:9], full[3:9])
    # query 5 of the first sequence sees keys 3, 4, 5 only: attention over those alone
    keys = k[3:6].repeat_interleave(2, dim=1)
    weights = torch.softmax(torch.einsum("hd,thd->ht", q[5], keys) * 0.3, dim=-1)
    torch.testing.assert_close(
        banded[5], torch.einsum("ht,thd->hd", weights, v[3:6].repeat_interleave(2, dim=1))
    )


def test_gemma_norm_and_geglu_are_transformers_arithmetic_to_the_bit_in_bf16():
    """Gemma's RMSNorm scales by 1 + weight in fp32 and casts last (Llama casts, then scales): in
    bf16 the order shows, so the kernel must match Gemma3RMSNorm exactly; GeGLU likewise."""
    from transformers.activations import ACT2FN
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from danlu.fast import kernels

    torch.manual_seed(4)
    norm = Gemma3RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    x = torch.randn(40, 64, dtype=torch.bfloat16) * 3
    assert torch.equal(kernels.gemma_rms_norm(x, norm.weight, norm.eps), norm(x))
    llama_order = (1.0 + norm.weight) * kernels.rms_norm(x, torch.ones_like(norm.weight), norm.eps)
    assert not torch.equal(llama_order, norm(x))  # the order of the casts is seen here
    gate, up = torch.randn(2, 40, 64, dtype=torch.bfloat16)
    assert torch.equal(kernels.geglu(gate, up), ACT2FN["gelu_pytorch_tanh"](gate) * up)


@pytest.mark.parametrize(
    "model_type, extra, why",
    [
        ("llama", {"attention_dropout": 0.1}, "attention dropout"),
        ("phi3", {"pad_token_id": 0, "resid_pdrop": 0.1}, "residual dropout"),
        ("phi3", {"pad_token_id": 0, "partial_rotary_factor": 0.5}, "rotary over half of each head"),
        ("gemma3_text", {**GEMMA3, "attn_logit_softcapping": 50.0}, "soft-capped attention logits"),
        ("gemma3_text", {**GEMMA3, "use_bidirectional_attention": True}, "bidirectional attention"),
        ("gemma3_text", {**GEMMA3, "attention_dropout": 0.1}, "attention dropout"),
        ("gemma3_text", {**GEMMA3, "hidden_activation": "gelu"}, "exact GELU, not GeGLU's tanh form"),
    ],
)
def test_other_decoders_fall_back_to_transformers_forward(model_type, extra, why):
    other = small(model_type, **extra)
    assert not decoder.supports(other), why
    assert fast.describe(other) == "chunked loss"
    other.eval()  # dropout off: the chunked loss over transformers' decoder gives its numbers
    batch = padded_batch()
    plain = token_loss_sum(forward(other, batch), batch["labels"])
    torch.testing.assert_close(fast.loss_sum(other, batch), plain, rtol=1e-5, atol=1e-4)
    assert fast.describe(small("llama")) == (  # on the CPU: nothing compiled
        "padding-free decoder, variable-length attention, LoRA inside the matmul, chunked loss"
    )
    assert fast.describe(small("llama"), LOSS_ONLY) == "chunked loss"


def test_the_log_names_offloading_only_where_layers_are_checkpointed(monkeypatch):
    monkeypatch.setattr(decoder, "offloads", lambda options, device: True)  # as on CUDA
    monkeypatch.setattr(decoder, "keeps_attention", lambda lm, options, device: True)
    model = small("llama")
    assert "CPU memory" not in fast.describe(model) and "recomputed" not in fast.describe(model)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    assert fast.describe(model).endswith(
        "checkpointed layers' inputs in CPU memory, attention not recomputed, chunked loss"
    )


@pytest.mark.parametrize("traced", [False, True], ids=["eager-addmm", "compiled-add"])
def test_lora_projections_equal_peft_and_fall_back_where_they_must(monkeypatch, traced):
    from peft import LoraConfig, get_peft_model

    from danlu.fast import lora

    # inside a compiled layer the update is a matmul plus an add; here both forms run eagerly
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: traced)

    x = torch.randn(2, 7, 48)
    for config, shared in [
        (LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), True),
        (LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=True), False),
    ]:
        model = get_peft_model(small("llama"), config)
        attn = model.base_model.model.model.layers[0].self_attn
        mods = [attn.q_proj, attn.k_proj, attn.v_proj]
        assert (lora._parts(attn.q_proj) is not None) == shared  # DoRA: peft's own forward
        for ours, want in zip(lora.project(mods, x), [m(x) for m in mods], strict=True):
            torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():  # a disabled adapter is the base layer alone
            assert lora._parts(attn.q_proj) is None
            torch.testing.assert_close(lora.project([attn.q_proj], x)[0], attn.q_proj.base_layer(x))


def test_layers_are_compiled_only_with_cuda_triton_and_a_c_compiler(monkeypatch):
    """Inductor's layer kernels need a CUDA device, Triton, and a C compiler for Triton's launcher;
    without any one of them the layers run eagerly (and the switch off means off)."""
    import importlib.util
    import shutil

    from danlu.fast import kernels

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    real_find_spec = importlib.util.find_spec
    have = {"triton": True, "cc": True}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            (object() if have["triton"] else None) if name == "triton" else real_find_spec(name, *a)
        ),
    )
    monkeypatch.setattr(
        shutil, "which", lambda c: f"/usr/bin/{c}" if have["cc"] and c in kernels.C_COMPILERS else None
    )

    def compiles(options, device) -> bool:
        kernels._toolchain.cache_clear()  # looked up once per process
        return decoder.compiles_layers(options, device)

    try:
        assert compiles(ALL, cuda)
        assert not compiles(ALL, cpu)  # Inductor's GPU kernels only
        assert not compiles(LOSS_ONLY, cuda)  # compile switched off
        have["cc"] = False
        assert not compiles(ALL, cuda)
        have["cc"], have["triton"] = True, False
        assert not compiles(ALL, cuda)
    finally:
        kernels._toolchain.cache_clear()


def test_a_4bit_base_is_dequantized_again_in_the_backward_not_kept():
    """A compiled, checkpointed layer over a 4-bit base recomputes the dequantized weights in the
    backward (keeping them would hold the 16-bit model in memory); other ops follow Inductor."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes  # noqa: F401  (registers its torch ops)
    from torch.utils.checkpoint import CheckpointPolicy

    assert (
        decoder._policy(None, torch.ops.bitsandbytes.dequantize_4bit.default)
        == CheckpointPolicy.MUST_RECOMPUTE
    )
    assert decoder._policy(None, torch.ops.aten.mm.default) == CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_offloaded_layer_inputs_give_the_same_loss_and_gradients(monkeypatch, dropout):
    """Each checkpointed layer's input leaves for CPU memory once and comes back once; nothing else
    is moved, and the loss and every LoRA gradient (dropout masks included) are unchanged."""
    from peft import LoraConfig, get_peft_model

    from danlu.fast import Options, offload

    base = small("llama")
    base.gradient_checkpointing_enable({"use_reentrant": False})
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout)
    model = get_peft_model(base, config)
    model.train()
    batch = padded_batch()
    off = Options(offload=False)

    def run(options):
        torch.manual_seed(3)
        model.zero_grad(set_to_none=True)
        loss = fast.loss_sum(model, batch, options)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want_loss, want = run(off)
    made = []

    def offloader(options, device, *shared):  # on a CPU the offloader is off; here CPU to CPU
        made.append(offload.Offloader(device, shared) if options.offload else None)
        return made[-1]

    monkeypatch.setattr(decoder, "_offloader", offloader)
    fetched = []
    real_fetch = offload.Offloader._fetch
    monkeypatch.setattr(
        offload.Offloader, "_fetch", lambda self, s: (fetched.append(s.index), real_fetch(self, s))
    )
    loss, grads = run(ALL)
    moved = made[-1]
    tokens, hidden = int(batch["attention_mask"].sum()), base.config.hidden_size
    assert len(moved.stored) == base.config.num_hidden_layers  # one input per layer, nothing else
    assert moved.moved_bytes == base.config.num_hidden_layers * tokens * hidden * 4
    assert fetched[0] == 1 and 0 in fetched  # the backward starts at the last layer, then the one below
    assert all(s.gpu is None for s in moved.stored)  # nothing kept once each layer's backward is done
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
    for name, g in want.items():
        assert (grads[name] - g).norm() / g.norm() < 1e-4, name


def compile_recording(monkeypatch, backward_graphs):
    """torch.compile as AOTAutograd with the min-cut partitioner Inductor uses, recording the
    backward graphs (no code generated); attention as one SDPA call (one sequence), which traces."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._functorch.aot_autograd import aot_module_simplified

    def backend(gm, inputs):
        def keep(graphs):
            return lambda g, _: (graphs.append(g), g)[1]

        return aot_module_simplified(
            gm, inputs, keep([]), keep(backward_graphs), partition_fn=min_cut_rematerialization_partition
        )

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=backend))
    monkeypatch.setattr(decoder, "compiles_layers", lambda *a: True)
    monkeypatch.setattr(
        decoder,
        "attention",
        lambda q, k, v, flat, scale, dense, window=None: F.scaled_dot_product_attention(
            *(t.transpose(0, 1)[None] for t in (q, k, v)), is_causal=True, scale=scale, enable_gqa=True
        )[0].transpose(0, 1),
    )


def matmuls(graph) -> int:
    return sum(n.target == torch.ops.aten.mm.default for n in graph.graph.nodes)


def run_compiled(backward_graphs, options, rank=4):
    """One compiled (as :func:`compile_recording` set up) LoRA step of a fresh small Llama on one
    row of 24 tokens: the loss, the LoRA gradients and each recorded backward graph's matmuls."""
    from peft import LoraConfig, get_peft_model

    decoder._compiled.cache_clear()
    torch._dynamo.reset()
    backward_graphs.clear()
    ids = torch.randint(3, 120, (1, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    base = small("llama")
    base.gradient_checkpointing_enable({"use_reentrant": False})
    lora = LoraConfig(r=rank, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, lora)
    model.train()
    loss = fast.loss_sum(model, batch, options)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, [matmuls(g) for g in backward_graphs]


def test_compiled_halves_do_not_recompute_o_proj(monkeypatch):
    """Compiled, each checkpointed half recomputes only what its backward reads: the attention
    half's output (o_proj's base and LoRA B matmuls) is kept instead, and the loss and gradients
    do not change (graphs recorded by :func:`compile_recording`)."""
    from danlu.fast import Options

    backward_graphs = []
    compile_recording(monkeypatch, backward_graphs)
    whole_loss, whole_grads, whole_mm = run_compiled(backward_graphs, Options(offload=False, split=False))
    loss, grads, mm = run_compiled(backward_graphs, Options(offload=False, split=True))
    assert len(whole_mm) == 1 and len(mm) == 2  # one graph per layer (reused), or one per half
    assert sum(mm) == whole_mm[0] - 2
    torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=1e-4)
    for name, g in whole_grads.items():
        assert (grads[name] - g).norm() / g.norm() < 1e-4, name
    decoder._compiled.cache_clear()
    torch._dynamo.reset()


def test_kept_attention_half_is_not_recomputed_and_waits_in_cpu_memory(monkeypatch):
    """With ``keep``, the compiled attention half keeps its base projections' and attention's
    outputs, moved to CPU memory with its input, instead of recomputing them: its backward has
    three matmuls fewer (q, k, v; LoRA's rank-r ones are still recomputed), the loss and every
    gradient are unchanged, and everything moved comes back once."""
    from danlu.fast import Options, offload

    backward_graphs = []
    compile_recording(monkeypatch, backward_graphs)
    monkeypatch.setattr(decoder, "offloads", lambda options, device: options.offload)  # CPU to CPU
    monkeypatch.setattr(offload, "SMALLEST", 1)  # the test's tensors are tiny
    made = []
    real = offload.Offloader
    monkeypatch.setattr(decoder, "Offloader", lambda *a: made.append(real(*a)) or made[-1])
    # rank 1: LoRA's matmuls are 16x narrower or wider than the projections, as at real sizes
    loss, grads, mm = run_compiled(backward_graphs, Options(keep=False), rank=1)
    kept_loss, kept_grads, kept_mm = run_compiled(backward_graphs, Options(keep=True), rank=1)
    # backward graphs, compiled in the backward's order: the MLP half's, then the attention half's
    assert len(mm) == 2 and kept_mm == [mm[0], mm[1] - 3]
    torch.testing.assert_close(kept_loss, loss, rtol=1e-5, atol=1e-4)
    for name, g in grads.items():
        assert (kept_grads[name] - g).norm() / g.norm() < 1e-4, name
    groups = made[-1].groups  # per layer: the attention half's (kept), the MLP half's input
    hidden, kv = 48, 16
    assert len(groups) == 4
    for attention, mlp in zip(groups[::2], groups[1::2], strict=True):
        shapes = sorted(tuple(s.host.shape) for s in attention.stored)
        # the half's input, q's, k's and v's projections, the attention's output (heads first)
        # and its statistics; never a weight (a parameter) nor the rotary tables
        assert shapes == [(1, 6, 24), (1, 6, 24, 8), (24, kv), (24, kv), (24, hidden), (24, hidden)]
        assert [tuple(s.host.shape) for s in mlp.stored] == [(24, hidden)]
    assert all(s.uses == 0 and s.gpu is None for g in groups for s in g.stored)  # each came back once
    decoder._compiled.cache_clear()
    torch._dynamo.reset()
