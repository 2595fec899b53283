"""Two or more fast-path option sets against each other on one of `danlu bench`'s cases, one run.

    PYTHONPATH=src python benchmarks/ab_options.py split=False split=True [--case lora-8b]
        [--rounds 2] [--steps 10] [--out FILE] [--smoke]

Each argument is one variant: ``field=value`` pairs of :class:`danlu.fast.Options` joined by
commas (``all`` is every part on). The variants run in turn, ``--rounds`` times over (A B A B:
drift of the GPU's clocks over the run shows up as a difference between rounds, not between
variants), each time on a freshly loaded model with bench's batches, warmup and timing
(:func:`danlu.bench.measure`). Writes tokens/s and peak memory of every run and, per variant,
the median of its runs' tokens/s, its first round's loss at every step, how far its rounds' losses
are apart (on a GPU, not bitwise: atomic adds in the backward), and how far its loss is from the
first variant's. ``--smoke`` runs bench's tiny shape on the CPU, to check the flow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from danlu import bench, fast


def options(spec: str) -> fast.Options:
    """``"split=False,offload=True"`` (or ``"all"``) as :class:`fast.Options`."""
    if spec == "all":
        return fast.ALL
    fields = {f.name for f in dataclasses.fields(fast.Options)}
    values = {}
    for pair in spec.split(","):
        name, _, value = pair.partition("=")
        if name not in fields or value not in ("True", "False"):
            raise SystemExit(f"variant {spec!r}: write field=True|False with a field of {sorted(fields)}")
        values[name] = value == "True"
    return fast.Options(**values)


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant: the median tokens/s of its runs, its peak, its loss curve and two spreads."""

    def rel(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))

    summary = {}
    for spec in variants:
        mine = [r for r in runs if r["variant"] == spec]
        summary[spec] = {
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in mine),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in mine],
            "peak_gib_max": max(r["peak_gib"] for r in mine),
            "losses": mine[0]["losses"],
            "loss_max_rel_diff_between_rounds": max(rel(r["losses"], mine[0]["losses"]) for r in mine),
        }
    first = summary[variants[0]]
    for row in summary.values():
        row["speed_vs_first"] = row["tokens_per_s_median"] / first["tokens_per_s_median"]
        row["loss_max_rel_diff_from_first"] = rel(row["losses"], first["losses"])
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--case", default="lora-8b", choices=[c for c, v in bench.CASES.items() if not v.varlen])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "ab_options.json"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    chosen = {spec: options(spec) for spec in args.variants}
    case, s = bench.CASES[args.case], bench.Settings(steps=args.steps, smoke=args.smoke)
    device = "cpu" if args.smoke else "cuda"
    shape, model_type, folder = bench.model_of(args.case, case, s, device)
    batches = bench.full_rows(shape, s)
    runs = []
    for round_ in range(args.rounds):
        for spec, opts in chosen.items():
            model, optimizer = bench.load_path(shape, model_type, device, case.quantization, folder, False)
            res = bench.measure(
                spec,
                model,
                optimizer,
                bench.danlu_step(opts),
                batches[: s.warmup],
                batches[s.warmup :],
                device,
            )
            runs.append({"variant": spec, "round": round_, **res.__dict__})
            print(
                f"round {round_} {spec}: {res.tokens_per_s:,.0f} tokens/s, peak {res.peak_gib:.2f} GiB",
                flush=True,
            )
            del model, optimizer
            bench.free_memory()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    summary = summarize(runs, args.variants)
    for spec, row in summary.items():
        print(f"{spec}: median {row['tokens_per_s_median']:,.0f} tokens/s ({row['speed_vs_first']:.3f}x)")
    report = {
        "what": f"fast.Options variants on bench case {args.case}: {case.what}",
        "environment": bench.environment(device),
        "settings": {**s.__dict__, "rounds": args.rounds},
        "torch": torch.__version__,
        "variants": {spec: dataclasses.asdict(o) for spec, o in chosen.items()},
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
