"""Load on `danlu serve`: concurrent streamed clients (the official `openai` client) on 127.0.0.1.

For each source tree given (``--tree NAME=SRC``: e.g. the commit before batching, extracted with
``git archive``, and this checkout), starts ``python -m danlu serve`` from it on a free local
port, warms it up, then runs each concurrency level: every client sends ``--rounds`` streamed
chat requests one after another (``max_tokens`` 32 by default, the same sampling for every tree).
Reports aggregate completion tokens/s (usage from the stream), time to first token and latency
(p50, p95), errors, and the load average around each run (a busy machine shows there).

    python benchmarks/serve_load.py --tree before=/tmp/danlu_before/src --tree after=src \\
        --out benchmarks/results/serve_load_cpu.json

``--engine-steps`` instead times decoding steps through each tree's ``Engine`` API (no HTTP, no
server): the requests of a level join one batch, and the time between one decoding forward's start
and the next is the step's cost, the host's work included. Set next to the HTTP levels, it says
how much of a level's time is the engine's and how much the server's.

``--peer transformers`` adds transformers' own server (``transformers serve --continuous-batching``)
on the same model in the same run. ``--build SHAPE`` first writes a random-weight model of a public
shape (``llama3-8b``, from danlu.plan.SHAPES, bf16, with ``--tokenizer``'s files) into ``--model``,
for the GPU machine, which has no model hub: tokens/s do not depend on the weights' values.

Bounded: at most ``max(--concurrency) * --rounds`` (or ``--min-requests``) requests per level, each
with a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOPICS = ["a lighthouse", "the sea", "a red fox", "an old clock", "winter", "a library", "the moon", "bread"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(src: str, model: str, port: int, precision: str, cpus: set[int] | None) -> subprocess.Popen:
    """A server on ``port``: danlu from the source tree ``src``, or ``src == "transformers"``: theirs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if src == "transformers":  # the peer: transformers' continuous batching (paged cache)
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(precision, "auto")
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--continuous-batching"]
        cmd += ["--port", str(port), "--host", "127.0.0.1", "--dtype", dtype, "--log-level", "warning"]
    else:
        path = os.pathsep.join(p for p in (str(Path(src).resolve()), os.environ.get("PYTHONPATH")) if p)
        env["PYTHONPATH"] = path
        cmd = [sys.executable, "-m", "danlu", "serve", "--model", model, "--port", str(port)]
        cmd += ["--precision", precision]
    if cpus:
        env["OMP_NUM_THREADS"] = str(len(cpus))
    log = open(f"{tempfile.gettempdir()}/serve_load_{port}.log", "w")  # noqa: SIM115 - the server's lifetime
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=pin)
    import httpx

    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server from {src} exited: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server from {src} did not start")


def one_request(client, model: str, i: int, max_tokens: int, extra: dict) -> dict:
    sent = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}],
        max_tokens=max_tokens,
        temperature=0.7,
        top_p=0.9,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    done = time.perf_counter()
    return {"ttft": (first or done) - sent, "latency": done - sent, "tokens": tokens}


def gpu_name() -> str | None:
    """The GPU the servers run on (nvidia-smi's name), or None on a machine without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else float("nan")


def level(
    base: str, model: str, clients: int, rounds: int, max_tokens: int, timeout: float, peer: bool = False
) -> dict:
    """``clients`` concurrent clients, ``rounds`` requests each. transformers' server refuses fields
    outside OpenAI's (422), so the peer gets none: its defaults are the same (top_k 50, no penalty)."""
    import openai

    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=timeout)
        for r in range(rounds):
            try:
                extra = {} if peer else {"top_k": 50, "repetition_penalty": 1.0}
                out = one_request(client, model, c * rounds + r, max_tokens, extra)
            except Exception as e:  # noqa: BLE001 - counted, not fatal
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            with lock:
                results.append(out)

    load = os.getloadavg()[0]
    began = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": pct([r["ttft"] for r in results], 0.5),
        "ttft_p95_s": pct([r["ttft"] for r in results], 0.95),
        "latency_p50_s": pct([r["latency"] for r in results], 0.5),
        "latency_p95_s": pct([r["latency"] for r in results], 0.95),
        "load_avg_1m_before": round(load, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }


def engine_steps(model: str, precision: str, sizes: list[int], max_tokens: int) -> list[dict]:
    """Median time per decoding step through the ``Engine`` API at each batch size (this process's
    danlu, whichever tree PYTHONPATH names), with the load's sampling settings."""
    import statistics

    from danlu.infer import Engine, GenerationSettings

    engine = Engine(model, precision=precision)
    starts: list[tuple[float, int, int]] = []

    def note(module, args, kwargs) -> None:
        starts.append((time.perf_counter(), *kwargs["input_ids"].shape))

    engine.model.register_forward_pre_hook(note, with_kwargs=True)
    settings = GenerationSettings(
        max_new_tokens=max_tokens, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0
    )
    rows = []
    for n in [1, *sizes]:  # the first is a warm-up
        starts.clear()
        load = os.getloadavg()[0]
        with engine.batcher.cond:  # the decoding thread waits to admit: all n join one batch
            gens = [
                engine.chat(
                    [{"role": "user", "content": f"Write a long story about {TOPICS[i % 8]}."}], settings
                )
                for i in range(n)
            ]
        began = time.perf_counter()
        for g in gens:
            g.text()
        tokens = sum(g.completion_tokens for g in gens)
        wall = time.perf_counter() - began
        decoding = [t for t, width, length in starts if length == 1 and width == n]
        gaps = [b - a for a, b in zip(decoding, decoding[1:], strict=False)]
        rows.append({
            "rows": n,
            "steps": len(starts),
            "step_ms_median": round(1000 * statistics.median(gaps), 2) if gaps else None,
            "tokens_per_s": round(tokens / wall, 1),
            "load_avg_1m_before": round(load, 2),
        })  # fmt: skip
    engine.shutdown()
    return rows[1:]


def engine_report(src: str, args: argparse.Namespace, sizes: list[int]) -> list[dict]:
    """:func:`engine_steps` in a child process that imports danlu from the tree ``src``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(src).resolve()), os.environ.get("PYTHONPATH")) if p
    )
    cmd = [sys.executable, __file__, "--engine-child", "--tree", f"child={src}", "--model", args.model]
    cmd += ["--precision", args.precision, "--concurrency", ",".join(map(str, sizes))]
    cmd += ["--max-tokens", str(args.max_tokens)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"engine steps from {src} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(shape_name: str, tokenizer_dir: str | None, folder: Path) -> None:
    """A random-weight model of a public shape, bf16, saved with a real tokenizer (GPU runs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from danlu.plan import SHAPES

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**SHAPES[shape_name], max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"built {shape_name} with random weights in {folder}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=SRC", help="a danlu source tree")
    p.add_argument("--peer", choices=["transformers"], default=None, help="also transformers' own server")
    p.add_argument(
        "--build", default=None, metavar="SHAPE", help="first write a random model of SHAPE to --model"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --build")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", default="1,4,8,16,32")
    p.add_argument("--rounds", type=int, default=1, help="requests per client, one after another")
    p.add_argument("--min-requests", type=int, default=8, help="more rounds at low concurrency, to this many")
    p.add_argument("--precision", default="auto")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per request")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--note", default="", help="what the trees and the model are, for the record")
    p.add_argument("--engine-steps", action="store_true", help="time the engine's steps, no server")
    p.add_argument("--engine-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--server-cpus",
        default=None,
        help="pin the servers to these cores (e.g. 0,1) and the clients to the rest",
    )
    args = p.parse_args()
    # a `timeout` that stops the run ends it like Ctrl-C: servers and children are stopped, the
    # levels written so far kept
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cpus = {int(c) for c in args.server_cpus.split(",")} if args.server_cpus else None
    if cpus:
        os.sched_setaffinity(0, set(os.sched_getaffinity(0)) - cpus or cpus)
    levels = [int(x) for x in args.concurrency.split(",")]
    if args.engine_child:
        print(json.dumps(engine_steps(args.model, args.precision, levels, args.max_tokens)))
        return 0
    if args.build:
        build(args.build, args.tokenizer, Path(args.model))
    trees = args.tree + ([f"{args.peer}={args.peer}"] if args.peer else [])
    report: dict = {
        "benchmark": "serve_load",
        "note": args.note,
        "model": args.model,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "min_requests": args.min_requests,
        "precision": args.precision,
        "peer": args.peer,
        "built": args.build,
        "sampling": "temperature 0.7, top_p 0.9, top_k 50, repetition_penalty 1.0 (in every request; "
        "the peer: temperature and top_p sent, top_k 50 and no penalty by its defaults)",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "gpu": gpu_name(),
        },
        "runs": {},
    }
    if args.engine_steps:
        report["benchmark"] = "engine_steps"
        for spec in args.tree:
            name, _, src = spec.partition("=")
            report["runs"][name] = {"source": src, "engine_steps": engine_report(src, args, levels)}
            for row in report["runs"][name]["engine_steps"]:
                print(f"{name:>8} {row['rows']:>3} rows: {row['step_ms_median']} ms a step, "
                      f"{row['tokens_per_s']} tokens/s", flush=True)  # fmt: skip
            if args.out:
                args.out.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    servers = {}
    try:
        for spec in trees:  # all up at once; each level then runs every tree in turn (same load)
            name, _, src = spec.partition("=")
            port = free_port()
            servers[name] = (
                src,
                start(src, args.model, port, args.precision, cpus),
                f"http://127.0.0.1:{port}",
            )
            level(servers[name][2], args.model, 1, 1, 4, args.timeout, src == args.peer)  # warm-up
            report["runs"][name] = {"source": src, "levels": []}
        for clients in levels:
            rounds = max(args.rounds, -(-args.min_requests // clients))
            for name, (src, _, base) in servers.items():
                row = level(
                    base, args.model, clients, rounds, args.max_tokens, args.timeout, src == args.peer
                )
                print(
                    f"{name:>8} {clients:>3} clients: {row['tokens_per_s']:6.1f} tokens/s, "
                    f"TTFT p95 {row['ttft_p95_s']:6.2f} s, errors {row['errors']}, "
                    f"load {row['load_avg_1m_before']}",
                    flush=True,
                )
                report["runs"][name]["levels"].append(row)
                if args.out:  # kept as it grows: a long run leaves what it measured
                    args.out.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        for _, proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
