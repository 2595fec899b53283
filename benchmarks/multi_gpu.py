"""Benchmark: danlu's multi-process training on 1..N GPUs at the same global batch.

Two cases, each run through `danlu train CONFIG --nproc N` (torchrun, NCCL) for every N asked:

- ``ddp-lora-8b``: Llama-3-8B shape, LoRA r16 on all linear layers, DDP, 2 × 2048 tokens per
  micro-batch and process, gradient checkpointing; global batch 4 sequences (1 GPU accumulates 2
  micro-batches, 2 GPUs one each, 4 GPUs ... per process batch 1).
- ``fsdp-full-1b``: Llama-3.2-1B shape, full fine-tuning under FSDP2, same batches;
- ``ddp-lora-8b-plain``: ``ddp-lora-8b`` with ``train.fast=off`` (transformers' own forward), to
  compare; not run unless asked for with ``--cases``.

Random bf16 weights (speed does not depend on the values), SmolLM2's tokenizer (ids are valid
rows of the larger vocabulary), text records cut to exactly 2048 tokens. From each run's
``metrics.jsonl``: tokens/s over the steps after the first two (warmup), tokens/s per GPU, rank 0's
peak ``max_memory_allocated``, and the loss at every step; scaling efficiency is
tokens/s(N) / (N × tokens/s(1)), and the losses of N GPUs are compared with 1 GPU's.

    PYTHONPATH=src python benchmarks/multi_gpu.py --tokenizer .tok [--gpus 1,2] [--steps 10]

Results go to ``$OUT/multi_gpu.json`` when ``$OUT`` is set (the device machine), else ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_gpu import build_model, fast_path_said, say, write_data  # noqa: E402

from danlu.plan import SHAPES  # noqa: E402

GLOBAL_BATCH = 4
MICRO = 2
CASES: dict[str, tuple[str, list[str]]] = {
    "ddp-lora-8b": (
        "llama3-8b",
        ["train.strategy=ddp", "train.method=lora", "lora.r=16", "lora.alpha=32", "lora.dropout=0"],
    ),
    "fsdp-full-1b": ("llama-1b", ["train.strategy=fsdp", "train.method=full", "train.lr=1e-5"]),
}
# the same DDP LoRA run through the plain transformers path, for comparison with the fast path
CASES["ddp-lora-8b-plain"] = (CASES["ddp-lora-8b"][0], [*CASES["ddp-lora-8b"][1], "train.fast=off"])


def run_case(name: str, model: Path, data: Path, work: Path, gpus: int, steps: int) -> dict[str, Any]:
    _, overrides = CASES[name]
    per_process = min(MICRO, GLOBAL_BATCH // gpus)
    accum = GLOBAL_BATCH // (per_process * gpus)
    out = work / f"out_{name}_{gpus}"
    cfg = work / "c.yaml"
    cfg.write_text("model: {}\n")
    args = [
        f"model.path={model}",
        f"data.path={data}",
        "data.max_seq_length=2048",
        f"output.dir={out}",
        "output.tensorboard=false",
        f"train.batch_size={per_process}",
        f"train.grad_accum={accum}",
        f"train.max_steps={steps}",
        "train.lr=1e-4",
        "train.scheduler=constant",
        "train.gradient_checkpointing=true",
        *overrides,
    ]
    tic = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "danlu", "train", str(cfg), *args, "--nproc", str(gpus), "--no-progress"],
        capture_output=True,
        text=True,
    )
    record: dict[str, Any] = {
        "case": name,
        "gpus": gpus,
        "batch_per_process": per_process,
        "grad_accum": accum,
        "global_batch": GLOBAL_BATCH,
        "seq": 2048,
        "wall_s": round(time.perf_counter() - tic, 1),
    }
    if proc.returncode != 0:
        record["error"] = proc.stderr[-3000:]
        return record
    record["fast_path"] = fast_path_said(proc.stdout + proc.stderr)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    timed = [r["tokens_per_s"] for r in rows[2:]]
    record.update(
        tokens_per_s=round(statistics.mean(timed)),
        tokens_per_s_per_gpu=round(statistics.mean(timed) / gpus),
        peak_allocated_gib_rank0=round(max(r.get("gpu_mem_gib", 0.0) for r in rows), 2),
        losses=[round(r["loss"], 5) for r in rows],
    )
    shutil.rmtree(out, ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default=None, help="process counts, e.g. 1,2 (default: 1 and all GPUs)")
    ap.add_argument("--cases", default="ddp-lora-8b,fsdp-full-1b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        say("no CUDA GPU: run this on the device machine")
        return 2
    from danlu.model import load_tokenizer, resolve

    n = torch.cuda.device_count()
    counts = [int(x) for x in args.gpus.split(",")] if args.gpus else sorted({1, n})
    tokenizer = load_tokenizer(args.tokenizer or resolve("smollm2-135m-instruct"))
    work = Path(tempfile.mkdtemp(prefix="danlu-multi-", dir=args.workdir))
    results: dict[str, Any] = {
        "device": f"{n} x {torch.cuda.get_device_name()}",
        "torch": torch.__version__,
        "runs": [],
    }
    try:
        write_data(work / "data.jsonl", records=64, words=3000)
        for name in args.cases.split(","):
            shape_name, _ = CASES[name]
            shape = dict(SHAPES[shape_name])
            shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
            model = work / f"model_{shape_name}"
            tic = time.perf_counter()
            build_model(shape, tokenizer, model, "cuda")
            say(f"built {shape_name} in {time.perf_counter() - tic:.0f} s")
            base = None
            for gpus in counts:
                record = run_case(name, model, work / "data.jsonl", work, gpus, args.steps)
                if "error" not in record:
                    if base is None and gpus == 1:
                        base = record
                    elif base is not None:
                        record["scaling_efficiency"] = round(
                            record["tokens_per_s"] / (gpus * base["tokens_per_s"]), 3
                        )
                        record["max_loss_diff_vs_1_gpu"] = max(
                            abs(a - b) for a, b in zip(record["losses"], base["losses"], strict=True)
                        )
                say(json.dumps({k: v for k, v in record.items() if k != "losses"}))
                results["runs"].append(record)
            shutil.rmtree(model, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "multi_gpu.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
