"""`danlu train` itself, fast path against plain path against fp32, on a cut 8B shape.

    PYTHONPATH=src python benchmarks/train_drift.py --tokenizer DIR [--layers 8] [--steps 6] [--out FILE]

Builds a random-weight Llama-3-8B shape cut to ``--layers`` layers (with SmolLM2's tokenizer, as
``benchmarks/multi_gpu.py`` does), writes ``text`` records cut to 2048 tokens, and runs
``danlu train`` (LoRA r16, batch 2 with 2 accumulated micro-batches, lr 1e-4, constant schedule,
gradient clipping at 1.0, checkpointing: the multi-GPU benchmark's DDP case) once per variant:

- ``fp32 plain``: ``train.precision=fp32 train.fast=off``, the reference;
- ``fp32 fast``: the fast path in fp32 (it should equal the reference: the same function);
- ``bf16 fast`` and ``bf16 plain``: the default precision on a GPU, each path;
- ``bf16 fast, DDP``: the fast path under DDP with one process (``--nproc 1``, NCCL).

Writes each variant's loss and gradient norm at every step, and each loss's relative difference
from the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_gpu import build_model, fast_path_said, write_data  # noqa: E402

from danlu.plan import SHAPES  # noqa: E402

VARIANTS = {
    "fp32 plain": ["train.precision=fp32", "train.fast=off"],
    "fp32 fast": ["train.precision=fp32", "train.fast=auto"],
    "bf16 fast": ["train.fast=auto"],
    "bf16 plain": ["train.fast=off"],
    "bf16 fast, DDP": ["train.fast=auto", "train.strategy=ddp", "--nproc", "1"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "train_drift.json"))
    args = ap.parse_args()
    from danlu.model import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="danlu-drift-"))
    shape = dict(SHAPES["llama3-8b"], num_hidden_layers=args.layers)
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    report: dict = {"command": "python benchmarks/train_drift.py " + " ".join(sys.argv[1:]), "variants": {}}
    try:
        build_model(shape, tokenizer, work / "model", "cuda")
        write_data(work / "data.jsonl", records=64, words=3000)
        (work / "c.yaml").write_text("model: {}\n")
        for name, extra in VARIANTS.items():
            report["variants"][name] = run(work, args.steps, extra)
            print(name, json.dumps(report["variants"][name]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = report["variants"]["fp32 plain"]["loss"]
    for v in report["variants"].values():
        v["loss_rel_diff_vs_fp32"] = [round((a - b) / b, 6) for a, b in zip(v["loss"], ref, strict=True)]
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def run(work: Path, steps: int, extra: list[str]) -> dict:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        f"model.path={work / 'model'}",
        f"data.path={work / 'data.jsonl'}",
        "data.max_seq_length=2048",
        f"output.dir={out}",
        "output.tensorboard=false",
        "train.batch_size=2",
        "train.grad_accum=2",
        f"train.max_steps={steps}",
        "train.lr=1e-4",
        "train.scheduler=constant",
        "train.gradient_checkpointing=true",
        "train.method=lora",
        "lora.r=16",
        "lora.alpha=32",
        "lora.dropout=0",
        *extra,
    ]
    cmd = [sys.executable, "-m", "danlu", "train", str(work / "c.yaml"), *args, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {
        "fast_path": fast_path_said(proc.stdout + proc.stderr),
        "loss": [r["loss"] for r in rows],
        "grad_norm": [r["grad_norm"] for r in rows],
    }


if __name__ == "__main__":
    main()
