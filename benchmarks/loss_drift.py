"""How far each training path's loss curve drifts from fp32 training, over the bench's steps.

    PYTHONPATH=src python benchmarks/loss_drift.py [--shape llama3-8b] [--layers 8] [--steps 53]
        [--paths fp32,baseline,plain,fast,fast-eager-rounding] [--out FILE] [--smoke]

Builds the shape's random-weight model (cut to ``--layers`` decoder layers) and trains LoRA (r16,
all linear layers, AdamW lr 2e-4, the bench's settings) on the bench's batches (2 x 2048, the
same data and seed as ``danlu bench``), once per path, each from the same start:

- ``fp32``: danlu's plain path with fp32 weights and fp32 arithmetic (TF32 off): the reference;
- ``baseline``: transformers + peft under bf16 autocast, as ``danlu bench`` runs it;
- ``plain``: danlu's plain path (train.fast=off), bf16 autocast;
- ``fast``: danlu's fast path (train.fast=auto), bf16 autocast;
- ``fast-eager-rounding``: the fast path with Inductor told to round every fused intermediate to
  bf16 where the eager operations would (``emulate_precision_casts``).

A path named twice runs twice (the second as "<path> again"), which measures how far a path's
own curve moves between runs from the same start (GPU kernels that add in varying order).
Prints and writes each path's losses and its largest and mean relative difference from the fp32
reference's loss, from the baseline's and, for a second run, from its first. ``--smoke`` runs
the flow on the CPU with the bench's tiny shape (rows of 64 tokens; no compiling there, so the
two fast paths are the same).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from danlu import bench, fast
from danlu.fast import decoder, kernels
from danlu.plan import SHAPES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=53)
    ap.add_argument("--paths", default="fp32,baseline,plain,fast,fast-eager-rounding")
    ap.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "loss_drift.json"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device, seq = ("cpu", 64) if args.smoke else ("cuda", 2048)
    base = bench.SMOKE_SHAPE if args.smoke else SHAPES[args.shape]
    shape = dict(base, num_hidden_layers=args.layers)
    model_type = bench.model_type_of(args.shape)
    batches = bench.full_rows(shape, bench.Settings(steps=args.steps, warmup=0, seq=seq, batch=2))
    report: dict = {
        "command": "python benchmarks/loss_drift.py " + " ".join(sys.argv[1:]),
        "environment": bench.environment(device),
        "shape": args.shape,
        "layers": args.layers,
        "steps": args.steps,
        "paths": {},
    }
    for path in args.paths.split(","):
        name = f"{path} again" if path in report["paths"] else path
        report["paths"][name] = {"losses": train(path, shape, model_type, batches, device)}
        print(name, " ".join(f"{x:.4f}" for x in report["paths"][name]["losses"]), flush=True)
    for against in ("fp32", "baseline"):
        if against in report["paths"]:
            for path, r in report["paths"].items():
                r[f"vs_{against}"] = difference(
                    path, r["losses"], against, report["paths"][against]["losses"]
                )
    for path, r in report["paths"].items():
        if path.endswith(" again"):
            first = path.removesuffix(" again")
            r["vs_its_first_run"] = difference(path, r["losses"], first, report["paths"][first]["losses"])
    Path(args.out).write_text(json.dumps(report, indent=1))


def difference(path: str, losses: list[float], against: str, ref: list[float]) -> dict[str, float]:
    """The largest, mean and mean signed relative difference of ``losses`` from ``ref``, printed."""
    rel = [abs(a - b) / b for a, b in zip(losses, ref, strict=True)]
    signed = [(a - b) / b for a, b in zip(losses, ref, strict=True)]
    out = {"max": max(rel), "mean": statistics.fmean(rel), "mean_signed": statistics.fmean(signed)}
    print(
        f"{path:22s} vs {against:8s}: max {out['max']:.4%}  mean {out['mean']:.4%}  "
        f"mean signed {out['mean_signed']:+.4%}"
    )
    return out


def train(path: str, shape: dict, model_type: str, batches: list[dict], device: str) -> list[float]:
    torch._dynamo.reset()  # each path compiles afresh, under its own Inductor settings
    decoder._compiled.cache_clear()
    kernels._compiled.cache_clear()
    torch._inductor.config.emulate_precision_casts = path == "fast-eager-rounding"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model, optimizer = bench.load_path(shape, model_type, device, None, None, path == "baseline")
    if path == "fp32":
        model.float()
    if path == "baseline":
        step = bench.baseline_step
    else:  # fp32 and plain: danlu's plain path; both fast variants: its fast path
        step = bench.danlu_step(fast.ALL if path.startswith("fast") else None)
    losses = []
    for batch in batches:
        b = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=path != "fp32"):
            loss = step(model, b)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    del model, optimizer
    bench.free_memory()
    return losses


if __name__ == "__main__":
    main()
