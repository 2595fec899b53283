"""Where the time of danlu's DPO step goes on the GPU: the bench's 8B case, profiled.

Runs the ``dpo-8b`` bench case's step (:func:`danlu.bench_dpo.danlu_step`'s parts, each timed with
CUDA events: the policy's log-probs, the reference's, the loss and backward, the optimizer), then
the whole step under ``torch.profiler``, and sorts the GPU kernels into kinds (matmuls, attention,
compiled Triton kernels, other elementwise, copies). Prints a table and writes JSON::

    python3 benchmarks/profile_dpo.py [--layers 32] [--checkpointing] [--out profile.json]

Needs a CUDA GPU; the numbers are what this run measured, nothing else.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from danlu import bench_dpo, objectives
from danlu import bench_parts as parts
from danlu.fast import ALL, Options
from danlu.fast.loss import sequence_logps
from danlu.methods import make_optimizer, prepare
from danlu.plan import SHAPES

KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("attention", ("flash", "fmha", "attn", "cudnn", "sdpa")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "cublas", "splitk")),
    ("compiled (triton)", ("triton",)),
    ("copy / index", ("memcpy", "memset", "copy", "index", "gather", "scatter", "cat")),
    ("elementwise / reduce (eager)", ("elementwise", "reduce", "vectorized", "unrolled")),
)


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, words in KINDS if any(w in low for w in words)), "other")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="profile_dpo.json")
    args = ap.parse_args()
    shape = dict(SHAPES["llama3-8b"], num_hidden_layers=args.layers)
    base = parts.build(shape, "llama", "cuda")
    cfg = parts.train_config()
    cfg.train.gradient_checkpointing = args.checkpointing
    model = prepare(base, cfg, torch.bfloat16, quantized=False)
    bench_dpo.same_start(model)
    optimizer = make_optimizer(
        [p for p in model.parameters() if p.requires_grad], bench_dpo.optimizer_config(), "cuda"
    )
    batches = [
        {k: v.cuda() for k, v in b.items()}
        for b in bench_dpo.pair_batches(shape["vocab_size"], 2, 3 + 2 * args.steps, 2048)
    ]
    names = ("policy log-probs", "reference log-probs", "loss + backward", "optimizer")

    def step(
        batch: dict[str, torch.Tensor], marks: list[torch.cuda.Event] | None = None, options: Options = ALL
    ) -> None:
        def mark() -> None:
            if marks is not None:
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()

        rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "prompt_lengths")}
        n = rows["input_ids"].shape[0] // 2
        mark()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.profiler.record_function(names[0]):
                logps, _ = sequence_logps(model, rows, options)
            mark()
            with torch.profiler.record_function(names[1]), torch.no_grad(), model.disable_adapter():
                ref, _ = sequence_logps(model, rows, options)
            mark()
            with torch.profiler.record_function(names[2]):
                loss = objectives.dpo(logps[:n], logps[n:], ref[:n], ref[n:], bench_dpo.BETA).losses.mean()
                loss.backward()
        mark()
        with torch.profiler.record_function(names[3]):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        mark()

    for b in batches[:3]:  # compiles
        step(b)
    torch.cuda.synchronize()
    parts_ms: dict[str, list[float]] = defaultdict(list)
    walls = []
    for b in batches[3 : 3 + args.steps]:
        marks: list[torch.cuda.Event] = []
        tic = time.perf_counter()
        step(b, marks)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - tic)
        for name, (a, z) in zip(names, zip(marks[:-1], marks[1:], strict=True), strict=True):
            parts_ms[name].append(a.elapsed_time(z))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for b in batches[3 + args.steps :]:
            step(b)
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time_total
        by_kind[kind(e.name)] += us / 1e3 / args.steps
        by_kernel[e.name] += us / 1e3 / args.steps
        calls[e.name] += 1
    # A/B: the same steps with equal-length pairs' attention through the variable-length kernel
    variable = Options(dense=False)
    for b in batches[:2]:
        step(b, options=variable)
    torch.cuda.synchronize()
    variable_walls = []
    for b in batches[3 : 3 + args.steps]:
        tic = time.perf_counter()
        step(b, options=variable)
        torch.cuda.synchronize()
        variable_walls.append(time.perf_counter() - tic)
    wall_ms = 1e3 * sorted(walls)[len(walls) // 2]
    result = {
        "shape": f"llama3-8b, {args.layers} layers",
        "checkpointing": args.checkpointing,
        "step_wall_ms_median": wall_ms,
        "tokens_per_s": 4 * 2048 / (wall_ms / 1e3) if args.layers == 32 else None,
        "step_wall_ms_median_variable_length_attention": 1e3
        * sorted(variable_walls)[len(variable_walls) // 2],
        "parts_ms_median": {k: sorted(v)[len(v) // 2] for k, v in parts_ms.items()},
        "gpu_kernel_ms_per_step": sum(by_kind.values()),
        "by_kind_ms_per_step": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms_per_step": [
            {"name": k[:160], "ms": v, "calls_per_step": calls[k] / args.steps}
            for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:40]
        ],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels_ms_per_step"}, indent=1))
    for row in result["top_kernels_ms_per_step"][:25]:
        print(f"{row['ms']:8.2f} ms {row['calls_per_step']:6.0f}x  {row['name'][:110]}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
