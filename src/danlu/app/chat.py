"""Terminal chat over :class:`danlu.infer.Engine`: streamed replies (a reasoning model's
``<think>`` block shown apart, or hidden), history, a few commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from danlu.app.common import (
    add_generation_flags,
    add_loading_flags,
    add_model_flags,
    add_thinking_flag,
    loading_options,
    model_for,
    settings_from,
    template_kwargs,
    trust_remote_code,
)
from danlu.errors import UserError

HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit; "
    "Ctrl-C stops a reply"
)


def run_chat(args: argparse.Namespace) -> int:
    if args.compare and not args.adapter:
        raise UserError("--compare needs --adapter DIR: it shows the base model's and the adapter's answers")
    if args.adapter and not Path(args.adapter).is_dir():
        raise UserError(f"--adapter {args.adapter}: no such folder; point it at OUTPUT/final of a run")
    from danlu.infer import Engine

    model = model_for(args, args.adapter)
    trust = trust_remote_code(args, model, args.adapter)
    engine = Engine(model, args.adapter, trust_remote_code=trust, **loading_options(args))
    settings = settings_from(args)
    label = f"{model}" + (f" + {args.adapter}" if args.adapter else "")
    print(f"danlu chat — {label}\n{HELP}", flush=True)
    try:
        return _converse(engine, settings, args)
    finally:
        engine.shutdown()  # no decoding thread left running while Python exits


def _converse(engine: Any, settings: Any, args: argparse.Namespace) -> int:
    """The prompt loop. Ctrl-C during a reply stops it and keeps what was said; at the prompt it quits."""
    sides = [("base", False), ("tuned", True)] if args.compare else [("assistant", True)]
    kwargs = template_kwargs(args)
    system = args.system
    histories: dict[str, list[dict]] = {name: [] for name, _ in sides}
    while True:
        try:
            line = input("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            histories = {name: [] for name, _ in sides}
            print("(conversation cleared)")
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip() or None
            histories = {name: [] for name, _ in sides}
            print(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)")
            continue
        if text.startswith("/"):
            print(HELP)
            continue
        for name, use_adapter in sides:
            history = histories[name]
            messages = [{"role": "system", "content": system}] if system else []
            messages += [*history, {"role": "user", "content": text}]
            sys.stdout.write(f"{name}> ")
            answer: list[str] = []
            try:
                _reply(engine.start(messages, settings, use_adapter, kwargs), answer, args.show_reasoning)
            except UserError as e:  # the template refused the conversation, or it outgrew the context
                print(f"error: {e}")
                break
            except KeyboardInterrupt:  # stop this reply, keep the conversation (and skip other sides)
                print(" [stopped]")
                history += [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": "".join(answer).strip()},
                ]
                break
            sys.stdout.write("\n")
            # the answer only: reasoning templates (Qwen3) drop earlier turns' reasoning anyway
            history += [
                {"role": "user", "content": text},
                {"role": "assistant", "content": "".join(answer).strip()},
            ]


def _reply(gen: Any, answer: list[str], show_reasoning: bool) -> None:
    """Print a reply as it streams: a ``<think>`` block apart (marked, or dimmed on a terminal), or
    not at all; the answer's pieces are appended to ``answer``."""
    from danlu.infer.reasoning import ReasoningSplitter

    splitter = ReasoningSplitter(gen.reasoning_open)
    tty = sys.stdout.isatty()
    open_, close = ("\033[2m", "\033[0m\n") if tty else ("[thinking] ", "\n[/thinking]\n")
    thinking = False

    def show(reasoning: str, content: str) -> None:
        nonlocal thinking
        if reasoning and show_reasoning:
            sys.stdout.write(("" if thinking else open_) + reasoning)
            thinking = True
        if content:
            if thinking:
                sys.stdout.write(close)
                thinking = False
            answer.append(content)
            sys.stdout.write(content)
        sys.stdout.flush()

    try:
        for piece in gen:
            show(*splitter.feed(piece))
        show(*splitter.flush())
    finally:
        if thinking:
            sys.stdout.write(close)


def add_parser(sub: Any) -> None:
    """Register `danlu chat` on the CLI's subparsers."""
    p = sub.add_parser(
        "chat",
        help="chat in the terminal with a model, with or without an adapter",
        description="Multi-turn chat that streams tokens. Commands: /reset, /system TEXT, /exit.",
    )
    add_model_flags(p, "LoRA adapter folder, e.g. out/identity/final")
    p.add_argument(
        "--compare", action="store_true", help="answer every prompt with the base model and with the adapter"
    )
    p.add_argument("--system", default=None, help="system prompt")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--show-reasoning",
        dest="show_reasoning",
        action="store_const",
        const=True,
        default=True,
        help="print a reasoning model's <think> block, marked apart from the answer (default)",
    )
    shown.add_argument(
        "--hide-reasoning",
        dest="show_reasoning",
        action="store_const",
        const=False,
        help="print the answer only",
    )
    add_thinking_flag(p)
    add_loading_flags(p)
    add_generation_flags(p)
    p.set_defaults(func=run_chat)
