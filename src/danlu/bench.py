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

import json
import math
import os
import platform
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from danlu import fast
from danlu import model as mdl
from danlu.bench_cases import CASES, Case
from danlu.bench_parts import (
    LINEARS,
    SMOKE_SHAPE,
    Sample,
    Settings,
    build,
    flops,
    free_memory,
    measure,
    model_type_of,
    pad_rows,
    random_rows,
    sentence,
    sync,
    train_config,
    vocabulary_words,
)
from danlu.data.render import IGNORE
from danlu.errors import UserError
from danlu.fast.loss import loss_sum
from danlu.methods import make_optimizer, prepare
from danlu.plan import SHAPES

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
        sync(device)
        tic = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
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
        res.mfu = flops(shape, timed_b) / sum(res.step_s) / 1e12 / peak
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
        build(shape, model_type, device).save_pretrained(folder)
        free_memory()
    return shape, model_type, folder


def full_rows(shape: dict[str, Any], s: Settings) -> list[dict[str, torch.Tensor]]:
    """The warmup then the timed batches of an equal-length case: ``s.batch`` full rows of ``s.seq``."""
    rows = random_rows(shape["vocab_size"], s.batch * (s.steps + s.warmup), s.seq, seed=1)
    return [pad_rows(rows[i : i + s.batch]) for i in range(0, len(rows), s.batch)]


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
            base = build(shape, model_type, device)
            mdl.enable_checkpointing(base, {"use_reentrant": False})
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
            else build(shape, model_type, device)
        )
        model = prepare(base, train_config(), dtype, quantized=qconfig is not None)
    return model, make_optimizer([p for p in model.parameters() if p.requires_grad], train_config(), device)


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


# ---- data


WARM_SAMPLES = 80  # for the baseline's warmup batches of 8 and at least three packed ones (~20 samples each)


def _varlen_samples(vocab: int, s: Settings) -> tuple[list[Sample], list[Sample]]:
    """Warmup and timed samples: log-normal lengths, median 180, clipped to 32..1024; prompt 30%."""
    words, weights = vocabulary_words(vocab, 2)
    rng = random.Random(2)
    n = WARM_SAMPLES + s.varlen_samples
    lengths = [min(1024, max(32, int(rng.lognormvariate(math.log(180), 0.75)))) for _ in range(n)]
    if s.smoke:
        lengths = [max(8, x // 16) for x in lengths]
    samples = [(sentence(rng, words, weights, x), int(0.3 * x)) for x in lengths]
    return samples[:WARM_SAMPLES], samples[WARM_SAMPLES:]


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
