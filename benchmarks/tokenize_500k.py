"""Benchmark: tokenize a generated 500,000-record alpaca file through danlu's data pipeline.

Measures what `danlu train` does before the first step: read, shape, render through the chat
template with loss masks, on all cores, then write the cache; and a second run that loads the
cache. Reports wall time and peak resident memory (this process and its worker processes).

    .venv/bin/python benchmarks/tokenize_500k.py [--records 500000] [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import tempfile
import time
from pathlib import Path

WORDS = (
    "the model data train answer question token learn value result system note time "
    "first second simple reason example small large fine tune chat assistant"
).split()
HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质"
PRONOUNS = ["请", "解释", "写", "总结", "翻译"]


def make_file(path: Path, n: int, seed: int = 0) -> None:
    """Alpaca-like records: short instructions, outputs of a few to a few hundred words; 30% Chinese."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            if rng.random() < 0.3:
                instruction = rng.choice(PRONOUNS) + "".join(rng.choices(HANZI, k=rng.randint(5, 30)))
                output = "".join(rng.choices(HANZI, k=int(rng.lognormvariate(4.5, 0.8)) + 5))
                extra = ""
            else:
                instruction = " ".join(rng.choices(WORDS, k=rng.randint(4, 25))).capitalize() + "?"
                extra = " ".join(rng.choices(WORDS, k=rng.randint(5, 40))) if rng.random() < 0.4 else ""
                output = " ".join(rng.choices(WORDS, k=int(rng.lognormvariate(4.2, 0.8)) + 3)) + "."
            f.write(
                json.dumps({"instruction": instruction, "input": extra, "output": output}, ensure_ascii=False)
                + "\n"
            )


def peak_rss_mb() -> tuple[float, float]:
    """Peak RSS of this process and of its largest waited-for child, in MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--max-seq-length", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/tokenize_500k_cpu.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DANLU_HOME"] = str(Path(tmp) / "home")  # a cold cache; the model is converted below
        home_model = Path(os.environ.get("BENCH_MODEL", "")) if os.environ.get("BENCH_MODEL") else None
        from danlu.config import load_config
        from danlu.data.dataset import build
        from danlu.model import load_tokenizer, resolve, stop_token_ids

        tokenizer = load_tokenizer(str(home_model) if home_model else resolve("smollm2-135m-instruct"))
        data = Path(tmp) / "alpaca_500k.json"  # JSON Lines in a .json file, as large public sets ship
        t0 = time.perf_counter()
        make_file(data, args.records)
        gen_s = time.perf_counter() - t0
        cfg = load_config(None, [f"data.path={data}", f"data.max_seq_length={args.max_seq_length}"]).data

        t0 = time.perf_counter()
        train, _, summary = build(cfg, tokenizer, stop_token_ids(tokenizer))
        cold_s = time.perf_counter() - t0
        own_cold, child_cold = peak_rss_mb()
        n_samples = len(train)
        del train

        t0 = time.perf_counter()
        train2, _, summary2 = build(cfg, tokenizer, stop_token_ids(tokenizer))
        warm_s = time.perf_counter() - t0
        assert summary2.cached and len(train2) == n_samples

    result = {
        "benchmark": "tokenize alpaca JSON Lines through danlu.data.dataset.build (chat template + loss masks)",
        "records": args.records,
        "samples": n_samples,
        "tokens": summary.tokens,
        "trained_tokens": summary.trained_tokens,
        "truncated": summary.truncated,
        "max_seq_length": args.max_seq_length,
        "generate_file_s": round(gen_s, 1),
        "cold_s": round(cold_s, 1),
        "cached_s": round(warm_s, 2),
        "records_per_s": round(args.records / cold_s),
        "peak_rss_main_mb": round(own_cold),
        "peak_rss_largest_worker_mb": round(child_cold),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
