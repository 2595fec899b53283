"""``danlu bench``: danlu's training step against transformers + peft, same run, same GPU."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from danlu.errors import UserError


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from danlu.bench_cases import CASES

    p = sub.add_parser(
        "bench",
        help="measure danlu's training speed and memory against transformers + peft (needs a GPU)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the peer baseline (transformers + peft, SDPA, gradient checkpointing, padded "
        "batches) and danlu's training path on the same random-weight model and data, one after the "
        "other, and report tokens/s, model FLOPs utilisation, peak memory and both loss curves.",
        epilog="cases:\n" + "\n".join(f"  {k:12} {c.what}" for k, c in CASES.items()),
    )
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    p.add_argument("--steps", type=int, default=50, help="timed steps of the baseline and the fast path")
    p.add_argument(
        "--out",
        default=None,
        help="JSON results file (default: $OUT/bench.json when $OUT is set, else bench.json)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the flow, not speed")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from danlu.bench import Settings, run, table

    if args.steps < 2:
        raise UserError(f"--steps {args.steps}: give at least 2")
    default = Path(os.environ["OUT"]) / "bench.json" if os.environ.get("OUT") else Path("bench.json")
    out = Path(args.out) if args.out else default
    settings = Settings(steps=args.steps, smoke=args.smoke)
    report = run([c.strip() for c in args.cases.split(",") if c.strip()], settings, out)
    print("\n".join(table(report)))
    print(f"results: {out}")
    return 0
