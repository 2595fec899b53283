"""``danlu plan``: will this run fit on the GPU? An estimate from config.json alone, before loading anything."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from danlu.errors import UserError

_UNITS = {
    "": 1024**3,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
}


def parse_gpu_mem(text: str) -> int:
    """Bytes of ``16GB``, ``16GiB``, ``24G``, ``80`` or ``16000MB``.

    GPU makers' "GB" are binary (a 24 GB card holds 24 GiB), so GB and GiB mean the same here;
    a bare number is GiB.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--gpu-mem {text!r}: give a size such as 16GB, 24GiB, 24G or 80 (GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def model_config(ref: str) -> dict[str, Any]:
    """The config.json of an alias, a local model folder, or a hub id already in the Hugging Face cache."""
    from danlu.model import resolve

    resolved = resolve(ref)
    path = Path(resolved) / "config.json"
    if not path.is_file():  # a hub id: only what is cached; the planner never downloads
        cached = None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(resolved, "config.json")
        except Exception:  # noqa: BLE001 - no hub library or a malformed id: treat as not cached
            cached = None
        if not isinstance(cached, str):
            raise UserError(
                f"model.path {ref}: the planner needs the model's config.json, and it is not downloaded; "
                f"fetch it (huggingface-cli download {ref} config.json), point model.path at a model folder, "
                "or plan with a built-in shape: --shape llama3-8b|qwen2.5-7b|llama-1b|qwen2.5-1.5b|smollm2-135m"
            )
        path = Path(cached)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e})") from None


def detect_gpu() -> tuple[int, str] | None:
    """(total bytes, name) of the current CUDA GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name()
    return total, f"{name}, {free / 1024**3:.1f} GiB free now"


def cmd_plan(args: argparse.Namespace) -> int:
    from danlu.config import load_config
    from danlu.plan import SHAPES, GiB, Shape, estimate, fits, suggestions

    budget = parse_gpu_mem(args.gpu_mem) if args.gpu_mem else None
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():  # no file, only overrides
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    if args.shape:
        if args.shape not in SHAPES:
            raise UserError(f"--shape {args.shape}: known shapes are {', '.join(SHAPES)}")
        mconf, source = SHAPES[args.shape], f"shape {args.shape}"
    else:
        mconf, source = model_config(cfg.model.path), cfg.model.path
    try:
        shape = Shape.from_config(mconf)
        plan = estimate(cfg, mconf)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    t = cfg.train
    method = getattr(t, "method", "lora")
    what = f"LoRA r{cfg.lora.r}" if method == "lora" else f"{method} tuning"
    quant = "" if cfg.model.quantization == "none" else f", {cfg.model.quantization} base"
    print(
        f"model: {source}: {plan.params / 1e9:.2f}B parameters ({shape.layers} layers, vocab {shape.vocab}); "
        f"{what}{quant}: {plan.trainable / 1e6:.1f}M trainable"
    )
    print(
        f"run: batch {t.batch_size} × {cfg.data.max_seq_length} tokens, "
        f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}"
    )
    print(plan.table())
    for note in plan.notes:
        print(f"note: {note}")
    if budget is not None:
        gpu = f"--gpu-mem {args.gpu_mem}"
    else:
        found = detect_gpu()
        if found is None:
            print("no CUDA GPU here: pass --gpu-mem 24GB to check against a budget")
            return 0
        budget, gpu = found
    if fits(plan, budget):
        print(f"fits: {plan.total / GiB:.1f} of {budget / GiB:.1f} GiB ({gpu})")
        return 0
    print(f"does not fit: {plan.total / GiB:.1f} GiB needed, {budget / GiB:.1f} GiB available ({gpu})")
    options = suggestions(cfg, mconf, budget)
    if options:
        print("to fit, add one of these to the command line:")
        for line in options:
            print(f"  {line}")
    else:
        print("nothing danlu can change makes it fit: use a smaller model or a larger GPU")
    return 0


def add_plan_parser(sub: Any) -> None:
    """Register ``danlu plan`` on the top-level subparsers."""
    p = sub.add_parser(
        "plan",
        help="estimate peak GPU memory of a training config before loading anything",
        description="Estimate the peak GPU memory of `danlu train CONFIG` from the model's config.json "
        "alone, say whether it fits the GPU here (or --gpu-mem), and what to change when it does not.",
    )
    p.add_argument(
        "config", nargs="?", default=None, help="YAML or JSON config file (default: built-in defaults)"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.batch_size=1"
    )
    p.add_argument(
        "--gpu-mem", default=None, help="GPU memory to plan for, e.g. 16GB, 24GiB, 80 (default: this GPU)"
    )
    p.add_argument(
        "--shape",
        default=None,
        help="plan for a built-in model shape instead of model.path: "
        "llama3-8b, qwen2.5-7b, llama-1b, qwen2.5-1.5b, smollm2-135m",
    )
    p.set_defaults(func=cmd_plan)
