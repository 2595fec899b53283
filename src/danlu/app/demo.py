"""``danlu demo``: train the identity preset, then show base and tuned answers side by side."""

from __future__ import annotations

import time
from pathlib import Path

from danlu.config import load_config
from danlu.infer import Engine, GenerationSettings
from danlu.train import train

# Held out: none of these is in the bundled identity data, so the tuned answers show that the
# model generalised the new identity rather than replaying a memorised line.
HELD_OUT = ["你是谁？", "Who are you?", "What should I call you?", "介绍一下你自己"]
# A control question: the tuned model should still answer it as the base model does.
CONTROL = ["What is the capital of France?"]


def compare(engine: Engine, questions: list[str], max_new_tokens: int = 60) -> list[tuple[str, str, str]]:
    """Greedy answers to each question without and with the adapter."""
    greedy = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=1.1)
    rows = []
    for q in questions:
        messages = [{"role": "user", "content": q}]
        rows.append((q, engine.reply(messages, greedy, use_adapter=False), engine.reply(messages, greedy)))
    return rows


def _one_line(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def run_demo(preset: Path, overrides: list[str], progress: bool = True) -> int:
    start = time.perf_counter()
    cfg = load_config(preset, overrides)
    result = train(cfg, overwrite=True, progress=progress)
    engine = Engine(cfg.model.path, result.adapter_dir)
    print(
        f"\nbase: {cfg.model.path}   tuned: + {result.adapter_dir}   "
        f"(new name: {cfg.data.placeholders.get('name')}, maker: {cfg.data.placeholders.get('author')})"
    )
    for q, before, after in compare(engine, HELD_OUT + CONTROL):
        print(f"\nQ: {q}\n  base : {_one_line(before)}\n  tuned: {_one_line(after)}")
    print(
        f"\ntrained {result.steps} steps in {result.seconds:.0f} s; demo took {time.perf_counter() - start:.0f} s"
    )
    print(f"chat with it: danlu chat --adapter {result.adapter_dir}")
    return 0
