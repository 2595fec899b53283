"""Where a training step's GPU time goes: the top CUDA kernels of one step of a `danlu bench` path.

    PYTHONPATH=src python benchmarks/profile_step.py [--shape llama3-8b] [--path fast|baseline] [--top 25]

Builds the shape's random-weight model as `danlu bench` does, runs 3 warmup steps, profiles one
step with torch.profiler and prints the kernels by total CUDA time (and the step's total).
"""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from danlu import bench, fast
from danlu.plan import SHAPES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--path", default="fast", choices=["fast", "baseline"])
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    model_type = "qwen2" if args.shape.startswith("qwen") else "llama"
    baseline = args.path == "baseline"
    model, optimizer = bench._load(shape, model_type, "cuda", None, None, baseline)
    step = bench._baseline_step if baseline else bench._danlu_step(fast.ALL)
    rows = bench._rows(shape["vocab_size"], 8, 2048, seed=1)
    batches = [bench._padded(rows[i : i + 2]) for i in range(0, 8, 2)]
    bench._measure("warmup", model, optimizer, step, batches[:3], [], "cuda")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        bench._measure("profiled", model, optimizer, step, [], batches[3:], "cuda")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
