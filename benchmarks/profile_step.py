"""Where a training step's GPU time goes: the top CUDA kernels of one step of a `danlu bench` path.

    PYTHONPATH=src python benchmarks/profile_step.py [--shape llama3-8b] [--path fast|baseline] [--top 25]

Builds the shape's random-weight model as `danlu bench` does, runs 3 warmup steps, profiles one
step with torch.profiler and prints the kernels by total CUDA time, then the GPU time by kind of
kernel (matmul, attention, Triton, copies, other) against the step's wall time, the same split by
phase (forward, loss, backward: the loss from its first kernel to its last, told by name), and
the longest stretches with no compute kernel running.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from danlu import bench, fast
from danlu.plan import SHAPES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--path", default="fast", choices=["fast", "baseline"])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cpu", action="store_true", help="record CPU operations too (slows the step down)")
    ap.add_argument(
        "--gaps", type=int, default=15, help="list the N longest stretches with no compute kernel"
    )
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    baseline = args.path == "baseline"
    model, optimizer = bench.load_path(shape, bench.model_type_of(args.shape), "cuda", None, None, baseline)
    step = bench.baseline_step if baseline else bench.danlu_step(fast.ALL)
    batches = bench.full_rows(shape, bench.Settings(steps=1, warmup=3))  # 4 batches of 2 x 2048
    bench.measure("warmup", model, optimizer, step, batches[:3], [], "cuda")
    activities = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if args.cpu else [ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        tic = time.perf_counter()
        bench.measure("profiled", model, optimizer, step, [], batches[3:], "cuda")
        wall = time.perf_counter() - tic
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))
    kernels = sorted(
        (e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start
    )
    kinds: Counter[str] = Counter()
    for event in kernels:
        kinds[kind(event.name)] += event.time_range.elapsed_us() / 1e3
    print(
        f"step wall {wall * 1e3:.1f} ms (profiled), kernel time {sum(kinds.values()):.1f} ms (streams overlap):"
    )
    for name, ms in kinds.most_common():
        print(f"  {name:10s} {ms:8.1f} ms")
    phases(kernels)
    gaps(kernels, args.gaps)


def gaps(kernels: list, n: int) -> None:
    """Print how long no compute kernel ran (copies between CPU and GPU do not count) and the longest gaps."""
    compute = [e for e in kernels if not re.search(r"Memcpy [DH]to[DH] \((Device|Pinned)", e.name)]
    found, end, last = [], compute[0].time_range.end, compute[0]
    for e in compute[1:]:
        if e.time_range.start > end:
            found.append((e.time_range.start - end, last.name, e.name))
        if e.time_range.end > end:
            end, last = e.time_range.end, e
    span = (end - compute[0].time_range.start) / 1e3
    idle = sum(g for g, _, _ in found) / 1e3
    print(
        f"first to last compute kernel {span:.1f} ms, no compute kernel running for {idle:.1f} ms "
        f"({len(found)} gaps, {sum(1 for g in found if g[0] > 100)} over 100 us); longest:"
    )
    for g, before, after in sorted(found, reverse=True)[:n]:
        print(f"  {g / 1e3:7.3f} ms  after {before[:60]}  before {after[:60]}")


LOSS = r"logsumexp|[Ss]oft[Mm]ax|cross_entropy|nll_loss"
"""Kernels of the loss (danlu's chunked loss, or the log-softmax and NLL of the model's own)."""


def phases(kernels: list) -> dict[str, dict[str, float]]:
    """Print and return the compute kernels' time (ms) by phase and kind: the forward before the
    loss's first kernel, the loss up to its last, the backward (and optimizer) after it."""
    compute = [e for e in kernels if kind(e.name) != "copy"]
    marks = [e.time_range.start for e in compute if re.search(LOSS, e.name)]
    first, last = (min(marks), max(marks)) if marks else (float("inf"), float("inf"))
    table: dict[str, dict[str, float]] = {}
    for e in compute:
        start = e.time_range.start
        phase = "forward" if start < first else "loss" if start <= last else "backward"
        row = table.setdefault(phase, {})
        row[kind(e.name)] = row.get(kind(e.name), 0.0) + e.time_range.elapsed_us() / 1e3
    for phase, row in table.items():
        parts = ", ".join(f"{k} {ms:.1f}" for k, ms in sorted(row.items(), key=lambda kv: -kv[1]))
        print(f"  {phase:8s} {sum(row.values()):7.1f} ms of compute kernels: {parts}")
    return table


KINDS = [  # first match wins
    ("attention", r"flash|fmha|cudnn|attn|sdpa"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|splitK"),
    ("triton", r"^triton_"),
    ("copy", r"[Mm]emcpy|[Mm]emset|copy|Cat|DtoD|HtoD|DtoH"),
]


def kind(name: str) -> str:
    """The kind of GPU work a kernel's name says it is."""
    return next((k for k, pattern in KINDS if re.search(pattern, name)), "other")


if __name__ == "__main__":
    main()
