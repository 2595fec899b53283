"""Terminal chat over :class:`danlu.infer.Engine`: streamed replies, history, a few commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from danlu.config import CONFIG_FILENAME, DEFAULT_MODEL
from danlu.errors import UserError
from danlu.infer import Engine, GenerationSettings

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


def base_of_adapter(adapter: str | Path) -> str | None:
    """The base model an adapter was trained on: the run's config, else the PEFT metadata."""
    path = Path(adapter)
    run_config = path.parent / CONFIG_FILENAME
    if run_config.is_file():
        return (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("model", {}).get("path")
    meta = path / "adapter_config.json"
    if meta.is_file():
        return json.loads(meta.read_text(encoding="utf-8")).get("base_model_name_or_path")
    return None


def settings_from(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def run_chat(args: argparse.Namespace) -> int:
    if args.compare and not args.adapter:
        raise UserError("--compare needs --adapter DIR: it shows the base model's and the adapter's answers")
    if args.adapter and not Path(args.adapter).is_dir():
        raise UserError(f"--adapter {args.adapter}: no such folder; point it at OUTPUT/final of a run")
    model = args.model or (base_of_adapter(args.adapter) if args.adapter else None) or DEFAULT_MODEL
    from danlu.app.cli import loading_options

    engine = Engine(model, args.adapter, **loading_options(args))
    settings = settings_from(args)
    label = f"{model}" + (f" + {args.adapter}" if args.adapter else "")
    print(f"danlu chat — {label}\n{HELP}", flush=True)
    sides = [("base", False), ("tuned", True)] if args.compare else [("assistant", True)]
    system = args.system
    histories: dict[str, list[dict]] = {name: [] for name, _ in sides}
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
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
            history.append({"role": "user", "content": text})
            messages = ([{"role": "system", "content": system}] if system else []) + history
            sys.stdout.write(f"{name}> ")
            pieces = []
            for piece in engine.stream(messages, settings, use_adapter=use_adapter):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": "".join(pieces).strip()})
