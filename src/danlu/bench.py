"""``danlu bench``: danlu's training step against the peer baseline, in one run, on one GPU.

The baseline is how the seeds' users train (and what TRL's SFTTrainer does): transformers +
peft, SDPA attention, gradient checkpointing, padded batches, the model's own loss, under bf16
autocast. The danlu path is what ``danlu train`` runs: the same base model, loaded and prepared
by danlu's own code (:func:`danlu.methods.prepare`), with :func:`danlu.fast.loss.loss_sum`.
Both get the same batches, the same LoRA initialisation (same seed) and the same AdamW.

Models are random-weight bf16 models of public shapes (speed does not depend on the values);
the data are sentences of "words" (short fixed token sequences drawn with Zipf frequencies), so
the loss falls over the steps and the two loss curves can be compared. Cases:

- ``lora-8b``: Llama-3-8B shape, LoRA r16 on all linear layers, batch 2 x 2048; with the ablation
  (danlu's plain path, then each part of the fast path added on its own);
- ``lora-qwen7b``: Qwen2.5-7B shape, the same;
- ``qlora-8b``: the 8B shape loaded in nf4 (double quantization), the same;
- ``dpo-8b``: DPO with LoRA on the 8B shape, 2 pairs per step, each branch a 1024-token prompt and a
  1024-token reply; the baseline is TRL's ``DPOTrainer`` with peft (:mod:`danlu.bench_dpo`), its
  reference forward (adapter disabled) included in both paths' time, not in the model FLOPs;
- ``varlen-8b``: samples of alpaca-like lengths (log-normal, median 180 tokens, 32-1024, the
  first 30% of each a masked prompt); the baseline pads batches of 8 to their longest sample,
  danlu packs the same samples into rows of up to 4096 tokens without padding. Only real
  (non-padding) tokens count.

Reported per path: tokens/s (median step), model FLOPs utilisation against the bf16 matmul peak
measured at the start of the run, peak memory over the timed steps, and the loss at every step.
Model FLOPs count the work a step must do, not what recomputation adds: the forward's matmuls
and attention, and the backward's input gradients (frozen weights need no weight gradients);
LoRA's own matmuls (< 1%) are left out.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from danlu import fast
from danlu import model as mdl
from danlu.bench_cases import CASES, Case
from danlu.config import Config
from danlu.data.render import IGNORE
from danlu.errors import UserError
from danlu.fast import varlen
from danlu.fast.loss import loss_sum
from danlu.methods import make_optimizer, prepare
from danlu.plan import SHAPES

SMOKE_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    tie_word_embeddings=False,
)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# the danlu variants: None is danlu's plain path (train.fast=off), the rest are fast.Options
FULL = ("danlu fast (train.fast=auto)", fast.ALL)  # after the ablation: + cuDNN attention, equal lengths
ABLATION = [
    ("danlu plain (train.fast=off)", None),
    ("+ chunked loss", fast.LOSS_ONLY),
    (
        "+ padding-free varlen attention",
        fast.Options(
            fused=False, lora=False, compile=False, offload=False, dense=False, split=False, keep=False
        ),
    ),
    (
        "+ fused RMSNorm/RoPE/SwiGLU",
        fast.Options(lora=False, compile=False, offload=False, dense=False, split=False, keep=False),
    ),
    (
        "+ LoRA inside the matmul",
        fast.Options(compile=False, offload=False, dense=False, split=False, keep=False),
    ),
    ("+ each layer compiled", fast.Options(offload=False, dense=False, split=False, keep=False)),
    ("+ layer inputs in CPU memory", fast.Options(dense=False, split=False, keep=False)),
    ("+ attention and MLP checkpointed apart", fast.Options(dense=False, keep=False)),
    ("+ attention not recomputed, kept in CPU memory", fast.Options(dense=False)),
]


@dataclass
class Settings:
    steps: int = 50
    warmup: int = 3
    seq: int = 2048
    batch: int = 2
    varlen_batch: int = 8
    varlen_samples: int = 400
    pack_tokens: int = 4096
    smoke: bool = False

    def __post_init__(self) -> None:
        if self.smoke:  # tiny shapes on the CPU: checks the flow in seconds
            self.seq, self.varlen_samples, self.pack_tokens = 64, 40, 256


@dataclass
class PathResult:
    path: str
    steps: int
    tokens_per_s: float
    step_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_gib: float = 0.0
    tokens: int = 0
    mfu: float = 0.0


def run(
    cases: list[str], settings: Settings, out: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run ``cases`` and write the results to ``out`` (JSON) after each one."""
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise UserError(f"danlu bench: unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    if not settings.smoke and not torch.cuda.is_available():
        raise UserError("danlu bench needs a CUDA GPU; --smoke runs tiny shapes on the CPU to check the flow")
    device = "cpu" if settings.smoke else "cuda"
    report: dict[str, Any] = {"environment": environment(device), "settings": settings.__dict__, "cases": {}}
    report["environment"]["matmul_peak_tflops"] = peak = matmul_peak(device)
    log(f"bf16 matmul peak: {peak:.2f} TFLOP/s")
    for name in cases:
        try:
            report["cases"][name] = _case(name, CASES[name], settings, device, peak, log)
        except Exception as e:  # noqa: BLE001 - one case failing (out of memory, a missing library) leaves the others
            report["cases"][name] = {
                "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            }
            log(f"  {name} failed: {report['cases'][name]['error']}")
            if settings.smoke:
                raise
        free_memory()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    return report


def matmul_peak(device: str) -> float:
    """TFLOP/s of a large bf16 matmul on ``device`` (the best of 23 rounds of 10)."""
    n = 8192 if device == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = math.inf
    for _ in range(23):
        _sync(device)
        tic = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - tic) / 10)
    return 2 * n**3 / best / 1e12


def _case(
    name: str, case: Case, s: Settings, device: str, peak: float, log: Callable[[str], None]
) -> dict[str, Any]:
    log(f"== {name}: {case.what}")
    if case.objective == "dpo":
        from danlu import bench_dpo

        return bench_dpo.case(case, s, device, peak, log)
    shape, model_type, folder = model_of(name, case, s, device)
    if case.varlen:  # warmup and timed steps see different samples; both paths the same ones
        warm, timed = _varlen_samples(shape["vocab_size"], s)
        b = s.varlen_batch
        base_batches = ([pad_rows(warm[i : i + b]) for i in range(0, b * s.warmup, b)],
                        [pad_rows(timed[i : i + b]) for i in range(0, len(timed), b)])  # fmt: skip
        # the compiled layers compile three times over the first distinct sizes (fixed, then dynamic
        # token counts, then dynamic sequence counts): the warmup packs enough samples for that
        fast_batches = (_packed(warm, s.pack_tokens)[: max(s.warmup, 3)], _packed(timed, s.pack_tokens))
    else:
        padded = full_rows(shape, s)
        base_batches = fast_batches = (padded[: s.warmup], padded[s.warmup :])
    variants = [("baseline: transformers + peft, SDPA, checkpointing", "baseline")]
    variants += [(label, opts) for label, opts in ABLATION] if case.ablation else []
    variants.append(FULL)
    results = []
    for label, opts in variants:
        warm_b, timed_b = fast_batches if case.varlen and opts != "baseline" else base_batches
        if not case.varlen and opts not in ("baseline", fast.ALL):
            timed_b = timed_b[:10]  # the ablation's middle rows: speed and memory only
        model, optimizer = load_path(shape, model_type, device, case.quantization, folder, opts == "baseline")
        step = baseline_step if opts == "baseline" else danlu_step(opts)
        res = measure(label, model, optimizer, step, warm_b, timed_b, device)
        res.mfu = _flops(shape, timed_b) / sum(res.step_s) / 1e12 / peak
        results.append(res)
        log(f"  {label}: {res.tokens_per_s:,.0f} tokens/s, MFU {res.mfu:.1%}, peak {res.peak_gib:.2f} GiB")
        del model, optimizer
        free_memory()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    base, best = results[0], results[-1]  # the baseline and danlu's full fast path
    summary = {
        "speedup": best.tokens_per_s / base.tokens_per_s,
        "memory_ratio": best.peak_gib / base.peak_gib if base.peak_gib else None,  # no peak on the CPU
    }
    if not case.varlen:  # same batches, same start: the loss curves must agree
        rel = [abs(a - b) / abs(b) for a, b in zip(best.losses, base.losses, strict=False)]
        summary["loss_max_rel_diff"] = max(rel)
        summary["loss_mean_rel_diff"] = statistics.fmean(rel)
    log(
        f"  danlu / baseline: {summary['speedup']:.2f}x tokens/s, {summary['memory_ratio'] or 0:.2f}x peak memory"
    )
    return {"what": case.what, "shape": case.shape, "paths": [r.__dict__ for r in results], **summary}


def model_of(name: str, case: Case, s: Settings, device: str) -> tuple[dict[str, Any], str, Path | None]:
    """``case``'s shape, model type and, for a quantized case, the folder of its saved bf16 model
    (bitsandbytes quantizes while loading: every path loads that one copy; the caller removes it)."""
    shape, model_type = SMOKE_SHAPE if s.smoke else SHAPES[case.shape], model_type_of(case.shape)
    folder = None
    if case.quantization:
        folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"danlu-bench-{name}"
        _build(shape, model_type, device).save_pretrained(folder)
        free_memory()
    return shape, model_type, folder


def model_type_of(shape_name: str) -> str:
    """The transformers model type a shape of :data:`danlu.plan.SHAPES` is built as."""
    return "qwen2" if shape_name.startswith("qwen") else "llama"


def full_rows(shape: dict[str, Any], s: Settings) -> list[dict[str, torch.Tensor]]:
    """The warmup then the timed batches of an equal-length case: ``s.batch`` full rows of ``s.seq``."""
    rows = random_rows(shape["vocab_size"], s.batch * (s.steps + s.warmup), s.seq, seed=1)
    return [pad_rows(rows[i : i + s.batch]) for i in range(0, len(rows), s.batch)]


def _build(shape: dict[str, Any], model_type: str, device: str) -> Any:
    """A random-weight bf16 model of ``shape`` (the same weights every call)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **shape, max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def load_path(
    shape: dict[str, Any],
    model_type: str,
    device: str,
    quant: str | None,
    folder: Path | None,
    baseline: bool,
) -> tuple[Any, torch.optim.Optimizer]:
    """The model of one path with its optimizer: the peers' setup, or danlu's own."""
    dtype = torch.bfloat16
    qconfig = mdl.quantization_config(quant, dtype, True) if quant else None
    if baseline:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if qconfig is not None:
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qconfig, dtype=dtype)
            base = prepare_model_for_kbit_training(base, True, {"use_reentrant": False})
        else:
            base = _build(shape, model_type, device)
            base.gradient_checkpointing_enable({"use_reentrant": False})
        base.config.use_cache = False
        lora = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEARS, task_type="CAUSAL_LM"
        )
        torch.manual_seed(0)
        model = get_peft_model(base, lora)
        model.train()
    else:
        base = (
            mdl.load_model(str(folder), dtype, device, False, qconfig, training=True)
            if qconfig
            else _build(shape, model_type, device)
        )
        model = prepare(base, _config(), dtype, quantized=qconfig is not None)
    return model, make_optimizer([p for p in model.parameters() if p.requires_grad], _config(), device)


def _config() -> Config:
    cfg = Config()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules = 16, 32, 0.0, list(LINEARS)
    cfg.train.seed, cfg.train.lr, cfg.train.weight_decay = 0, 2e-4, 0.0
    cfg.train.gradient_checkpointing = True
    return cfg


def baseline_step(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    return out.loss


def danlu_step(options: fast.Options | None) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    from danlu.train import forward, token_loss_sum

    def step(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = (batch["labels"][:, 1:] != IGNORE).sum()
        summed = (
            loss_sum(model, batch, options)
            if options
            else token_loss_sum(forward(model, batch), batch["labels"])
        )
        loss = summed / n
        loss.backward()
        return loss

    return step


def measure(
    label: str, model: Any, optimizer: Any, step: Callable, warm: list[dict], timed: list[dict], device: str
) -> PathResult:
    """Run the warmup batches, then time each of the others (peak memory over those only)."""
    times, losses, tokens = [], [], 0
    for i, batch in enumerate(warm + timed):
        if i == len(warm):
            _sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = step(model, b)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # waits for the step
        _sync(device)
        if i >= len(warm):
            times.append(time.perf_counter() - tic)
            tokens += sum(_lengths(batch))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return PathResult(label, len(times), tokens / sum(times) if times else 0.0, times, losses, peak, tokens)


def _flops(shape: dict[str, Any], batches: list[dict[str, torch.Tensor]]) -> float:
    """Model FLOPs of ``batches``: forward + input-gradient backward of the linears (2 x 2 x params
    per token) and of attention (forward 2 x 2 x L^2/2 x heads x d per causal sequence of length L,
    backward twice that)."""
    h, layers, v = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    linear = layers * (2 * h * q + 2 * h * kv + 3 * h * shape["intermediate_size"]) + h * v
    total = 0.0
    for batch in batches:
        for length in _lengths(batch):
            total += 4 * linear * length + 3 * layers * 2 * q * length * length
    return total


def _lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """The real sequences' lengths, padded or packed: where the fast path's flattening finds them."""
    return varlen.flatten(batch).cu_seqlens.diff().tolist()


# ---- data

Sample = tuple[list[int], int]  # tokens, prompt length


def _words(vocab: int, seed: int) -> tuple[list[list[int]], list[float]]:
    rng = random.Random(seed)
    words = [[rng.randrange(3, min(vocab, 32000)) for _ in range(rng.randint(1, 3))] for _ in range(2000)]
    return words, [1 / (i + 1) for i in range(len(words))]


def _sentence(rng: random.Random, words: list[list[int]], weights: list[float], n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids.extend(rng.choices(words, weights)[0])
    return ids[:n]


def random_rows(vocab: int, n: int, length: int, seed: int) -> list[Sample]:
    """``n`` rows of ``length`` tokens, all trained."""
    words, weights = _words(vocab, seed)
    rng = random.Random(seed)
    return [(_sentence(rng, words, weights, length), 0) for _ in range(n)]


WARM_SAMPLES = 80  # for the baseline's warmup batches of 8 and at least three packed ones (~20 samples each)


def _varlen_samples(vocab: int, s: Settings) -> tuple[list[Sample], list[Sample]]:
    """Warmup and timed samples: log-normal lengths, median 180, clipped to 32..1024; prompt 30%."""
    words, weights = _words(vocab, 2)
    rng = random.Random(2)
    n = WARM_SAMPLES + s.varlen_samples
    lengths = [min(1024, max(32, int(rng.lognormvariate(math.log(180), 0.75)))) for _ in range(n)]
    if s.smoke:
        lengths = [max(8, x // 16) for x in lengths]
    samples = [(_sentence(rng, words, weights, x), int(0.3 * x)) for x in lengths]
    return samples[:WARM_SAMPLES], samples[WARM_SAMPLES:]


def pad_rows(rows: list[Sample]) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for r, (tokens, prompt) in enumerate(rows):
        ids[r, : len(tokens)] = torch.tensor(tokens)
        mask[r, : len(tokens)] = 1
        labels[r, prompt : len(tokens)] = torch.tensor(tokens[prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed(samples: list[Sample], budget: int) -> list[dict[str, torch.Tensor]]:
    """The samples in order, as padding-free rows of up to ``budget`` tokens (first token of each unlabelled)."""
    out, row = [], []
    for sample in [*samples, None]:
        if sample is None or (row and sum(len(t) for t, _ in row) + len(sample[0]) > budget):
            ids = torch.tensor([t for tokens, _ in row for t in tokens])
            pos = torch.cat([torch.arange(len(tokens)) for tokens, _ in row])
            labels = torch.cat(
                [torch.tensor([IGNORE] * max(p, 1) + tokens[max(p, 1) :]) for tokens, p in row]
            )
            out.append(
                {
                    "input_ids": ids[None],
                    "position_ids": pos[None],
                    "labels": labels[None],
                }
            )
            row = []
        if sample is not None:
            row.append(sample)
    return out


# ---- helpers


def environment(device: str) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def table(report: dict[str, Any]) -> Iterator[str]:
    """The results as Markdown table rows."""
    yield "| case | path | tokens/s | MFU | peak GiB | loss, last step |"
    yield "|---|---|---:|---:|---:|---:|"
    for name, case in report["cases"].items():
        for p in case.get("paths", []):
            yield (
                f"| {name} | {p['path']} | {p['tokens_per_s']:,.0f} | {p['mfu']:.1%} | "
                f"{p['peak_gib']:.2f} | {p['losses'][-1]:.4f} |"
            )
