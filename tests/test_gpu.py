"""CUDA paths: bf16/fp16 training, QLoRA on the GPU, packing under CUDA attention, full tuning.

Marked ``gpu``: skipped without CUDA, run on the device machine; results are committed as
``benchmarks/results/gpu_tests.json`` (see README, Development).
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import write_jsonl
from danlu.config import load_config
from danlu.data.dataset import collate
from danlu.data.packing import pack
from danlu.data.render import IGNORE, render
from danlu.fast import varlen
from danlu.train import forward, token_loss_sum, train
from test_distributed import losses as logged_losses
from test_distributed import run_danlu

pytestmark = pytest.mark.gpu
RECORDS = [
    {"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}, says Danlu."} for i in range(8)
]


def settings(tiny_model_dir, tmp_path, *extra) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    return [
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
    ]


def run(tiny_model_dir, tmp_path, *extra):
    return train(load_config(None, settings(tiny_model_dir, tmp_path, *extra)), progress=False)


def run_torchrun(tiny_model_dir, tmp_path, *extra) -> tuple[subprocess.CompletedProcess, list[float]]:
    """The same run as :func:`run` launched as one torchrun process (NCCL): its output and losses."""
    cfg = tmp_path / "c.yaml"
    args = settings(tiny_model_dir, tmp_path, *extra)  # makes tmp_path
    cfg.write_text("model: {}\n")
    proc = run_danlu("train", str(cfg), *args, "--nproc", "1", "--no-progress")
    return proc, list(logged_losses(tmp_path / "run").values())


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


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"])
def test_bitsandbytes_optimizers_on_cuda(tiny_model_dir, tmp_path, optimizer):
    """On CUDA the paged optimizers really page (on the CPU bitsandbytes falls back to plain state)."""
    pytest.importorskip("bitsandbytes")
    result = run(tiny_model_dir, tmp_path, f"train.optimizer={optimizer}")
    assert result.losses[-1] < 0.8 * result.losses[0]


def test_int8_base_trains_on_cuda(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = run(tiny_model_dir, tmp_path, "model.quantization=int8")
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]


def test_engine_in_4_bits_and_with_a_device_map_on_cuda(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from danlu.infer import Engine, GenerationSettings

    greedy = GenerationSettings(max_new_tokens=5, temperature=0)
    hi = [{"role": "user", "content": "Hello"}]
    small = Engine(str(tiny_model_dir), quantization="nf4")
    assert any(type(m).__name__ == "Linear4bit" for m in small.model.modules())
    reply = small.chat(hi, greedy)
    reply.text()  # counts are set once the reply has been read
    assert reply.completion_tokens > 0
    mapped = Engine(str(tiny_model_dir), device_map="auto")
    assert {p.device.type for p in mapped.model.parameters()} == {"cuda"}  # one GPU: all on it
    reply = mapped.chat(hi, greedy)
    reply.text()
    assert reply.completion_tokens > 0


@pytest.mark.parametrize(
    "extra",
    [
        ("train.strategy=ddp", "model.quantization=nf4", "train.gradient_checkpointing=true"),
        ("train.strategy=fsdp",),  # bf16 base + fp32 adapter: gathered in bf16
        ("train.strategy=fsdp", "train.method=full", "train.lr=1e-3"),
        ("train.strategy=fsdp", "train.fsdp_offload=true"),
    ],
    ids=["ddp-qlora", "fsdp-lora", "fsdp-full", "fsdp-offload"],
)
def test_torchrun_on_one_gpu_with_nccl(tiny_model_dir, tmp_path, extra):
    """The multi-process code paths (NCCL, DDP, FSDP2 mixed precision) with one process."""
    if "model.quantization=nf4" in extra:
        pytest.importorskip("bitsandbytes")
    _, losses = run_torchrun(tiny_model_dir, tmp_path, "train.save_every=10", *extra)
    assert len(losses) == 15 and losses[-1] < losses[0]
    out = tmp_path / "run"
    assert (out / "checkpoint-10").is_dir() and (out / "final").is_dir()


def test_ddp_takes_the_compiled_fast_path_and_matches_one_process_on_cuda(tiny_model_dir, tmp_path):
    one = run(tiny_model_dir, tmp_path / "one")
    proc, losses = run_torchrun(tiny_model_dir, tmp_path / "ddp", "train.strategy=ddp")
    said = proc.stdout + proc.stderr
    assert "fast path: padding-free decoder, variable-length attention, each layer compiled" in said
    assert losses == pytest.approx(one.losses, rel=1e-3)  # one rank: DDP's reduction changes nothing
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3", "mistral-window", "gemma3_text"])
@pytest.mark.parametrize("lengths", ["mixed", "equal"])
def test_padding_free_decoder_agrees_with_transformers_in_bf16_on_cuda(lengths, model_type):
    """Flash varlen attention (mixed lengths) or cuDNN attention (equal lengths) + compiled
    layers (bf16) against SDPA + transformers' modules (bf16), both measured against an fp32
    reference: the fast path may not be further off than bf16 is. Its attention halves kept
    (not recomputed, in CPU memory) give what recomputing them gives."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from danlu.fast import ALL, Options, decoder
    from danlu.fast import loss as fast

    extra = {  # Qwen3: q/k norms over each head; Phi-3: fused projections; a window shorter than rows
        "qwen3": {"head_dim": 64},
        "phi3": {"pad_token_id": 0},
        "mistral-window": {"sliding_window": 32},
        # Gemma-3: its norms in bf16, GeGLU, a local layer (window shorter than rows) and a global one
        "gemma3_text": {
            "head_dim": 64,
            "query_pre_attn_scalar": 48,
            "sliding_window": 32,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    }.get(model_type, {})
    q_proj = "qkv_proj" if model_type == "phi3" else "q_proj"
    config = AutoConfig.for_model(
        model_type.removesuffix("-window"), vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(3, 512, (3, 96), device="cuda")
    mask = torch.ones_like(ids)
    if lengths == "mixed":
        mask[1, 70:] = 0
        mask[2, 20:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :8] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert varlen.uniform(varlen.flatten(batch), int(mask.sum())) == (lengths == "equal")

    def grads(dtype, run):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config).to("cuda", dtype)
        assert decoder.supports(base)
        base.gradient_checkpointing_enable({"use_reentrant": False})
        torch.manual_seed(1)
        # one layer's q_proj scaled differently: the compiled layer must treat the scaling as a constant
        lora = LoraConfig(
            r=8,
            target_modules="all-linear",
            init_lora_weights=False,
            alpha_pattern={f"layers.1.self_attn.{q_proj}": 32},
        )
        model = get_peft_model(base, lora)
        assert getattr(model.base_model.model.model.layers[1].self_attn, q_proj).scaling["default"] == 4.0
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = run(model)
        loss.backward()
        return float(loss), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    def plain(model):
        return token_loss_sum(forward(model, batch), batch["labels"])

    ref_loss, ref = grads(torch.float32, plain)
    hf_loss, hf = grads(torch.bfloat16, plain)
    fast_loss, ours = grads(torch.bfloat16, lambda m: fast.loss_sum(m, batch, ALL))
    assert abs(fast_loss - ref_loss) <= 2 * abs(hf_loss - ref_loss) + 1e-3 * abs(ref_loss)
    for name, g in ref.items():
        hf_err = float((hf[name] - g).norm() / g.norm())
        fast_err = float((ours[name] - g).norm() / g.norm())
        assert fast_err <= 2 * hf_err + 1e-2, (name, fast_err, hf_err)
    again_loss, again = grads(torch.bfloat16, lambda m: fast.loss_sum(m, batch, Options(keep=False)))
    assert abs(again_loss - fast_loss) <= 1e-4 * abs(fast_loss)
    for name, g in again.items():
        # not bitwise: the kept half's graph is fused differently, so bf16 rounds elsewhere (up to
        # 1.3% measured on the H100); a tensor of another layer or step would be off by far more
        assert float((ours[name] - g).norm() / g.norm()) < 3e-2, name


@pytest.mark.parametrize("gqa", [False, True])
def test_sliding_window_in_the_flash_kernel_equals_the_masked_attention_on_cuda(gqa):
    """A window through flash varlen attention (bf16) against the banded mask (fp32, SDPA one
    sequence at a time): the same outputs and gradients to bf16 rounding."""
    torch.manual_seed(0)
    heads, d, window = 8, 64, 48
    kv = 2 if gqa else heads
    lengths = [200, 31, 120]  # longer and shorter than the window
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    flat = varlen.Flat(None, None, None, cu, max(lengths))
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, device="cuda") for h in (heads, kv, kv))
    grad = torch.randn(total, heads, d, device="cuda")

    def run(dtype):
        q_, k_, v_ = (t.to(dtype).requires_grad_() for t in (q, k, v))
        out = varlen.attention(q_, k_, v_, flat, d**-0.5, window=window)
        out.backward(grad.to(dtype))
        return [t.float() for t in (out, q_.grad, k_.grad, v_.grad)]

    assert "window_size" in varlen._CAUSAL, "this torch's varlen_attn takes no window"
    full = varlen.attention(q, k, v, flat, d**-0.5)
    for ours, want in zip(run(torch.bfloat16), run(torch.float32), strict=True):
        assert float((ours - want).norm() / want.norm()) < 1e-2
    assert float((run(torch.float32)[0] - full).norm() / full.norm()) > 1e-2  # the window mattered


@pytest.mark.parametrize("gqa", [False, True])
def test_dense_attention_equals_the_variable_length_kernel_on_cuda(monkeypatch, gqa):
    """Equal-length sequences through cuDNN (as a batch) and through flash varlen: the same
    outputs and gradients, to bf16 rounding, for grouped-query heads too."""
    torch.manual_seed(0)
    n, length, heads, d = 3, 256, 8, 64
    kv = 2 if gqa else heads
    cu = torch.arange(0, (n + 1) * length, length, dtype=torch.int32, device="cuda")
    flat = varlen.Flat(None, None, None, cu, length)
    q, k, v = (torch.randn(n * length, h, d, device="cuda", dtype=torch.bfloat16) for h in (heads, kv, kv))
    grad = torch.randn(n * length, heads, d, device="cuda", dtype=torch.bfloat16)
    dense_calls = []
    real = varlen._dense
    monkeypatch.setattr(varlen, "_dense", lambda *a: dense_calls.append(1) or real(*a))

    def run(dense):
        q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
        out = varlen.attention(q_, k_, v_, flat, d**-0.5, dense=dense)
        out.backward(grad)
        return [out, q_.grad, k_.grad, v_.grad]

    for ours, want in zip(run(True), run(False), strict=True):
        assert float((ours.float() - want.float()).norm() / want.float().norm()) < 1e-2
    assert len(dense_calls) == 1  # the first run went the dense way, the second did not


@pytest.mark.parametrize("quantized", [False, True])
def test_fast_path_keeps_little_but_weights_from_forward_to_backward_on_cuda(tmp_path, quantized):
    """What the forward leaves on the GPU for the backward: with the halves' inputs offloaded, at
    most one of them, and with the attention halves kept only their small statistics more (their
    outputs go to CPU memory too); a 4-bit base's compiled layers never keep dequantized weights."""
    if quantized:
        pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from danlu.fast import ALL, Options, decoder, varlen

    layers, hidden, inter, tokens = 4, 1024, 4096, 2048
    config = LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    if quantized:
        base.save_pretrained(tmp_path)
        nf4 = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=nf4, dtype=torch.bfloat16)
    base = base.cuda()
    base.gradient_checkpointing_enable({"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear"))
    model.train()
    ids = torch.randint(3, 512, (1, tokens), device="cuda")
    flat = varlen.flatten({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    lm = model.base_model.model

    def held(options):
        for _ in range(2):  # the first pass compiles
            torch.cuda.synchronize()
            torch.empty(1, device="cuda")  # lets the allocator take back blocks the copies have released
            before = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = decoder.hidden_states(lm, flat, options)
            torch.cuda.synchronize()
            torch.empty(1, device="cuda")
            after = torch.cuda.memory_allocated() - out.numel() * out.element_size()
            out.float().sum().backward()
            del out  # else the next pass's "before" counts it
            model.zero_grad(set_to_none=True)
        return after - before

    layer_input = tokens * hidden * 2
    dequantized = (4 * hidden * hidden + 3 * hidden * inter) * 2  # one layer's weights in bf16
    kept, recomputing, offloaded = held(Options(offload=False)), held(Options(keep=False)), held(ALL)
    halves = 2 * layers  # compiled layers are checkpointed as two halves, each keeping its input
    assert kept >= halves * layer_input, kept
    assert recomputing <= kept - (halves - 1) * layer_input, (kept, recomputing)
    # keeping the attention halves' outputs (16 MB a layer here) adds only what is too small to
    # move: attention's statistics (64 KB a layer here)
    assert offloaded <= recomputing + layer_input // 4, (recomputing, offloaded)
    assert kept < halves * layer_input + dequantized, kept  # never a layer's dequantized weights per layer
