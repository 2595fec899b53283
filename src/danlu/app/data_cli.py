"""``danlu data``: look at training data the way the trainer will, before spending GPU hours.

``check`` counts records, turns, tokens and truncation and lists problems; ``preview`` prints
the exact text the model sees with the trained tokens marked; ``stats`` plots the token
lengths; ``convert`` writes a normalized ``{"messages": [...]}`` JSON Lines copy. All of them
read the data through the same path as training (``load_conversations`` → ``tokenize``) and
load only the tokenizer, never the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from danlu.config import DEFAULT_MODEL, DataConfig, load_config
from danlu.data.formats import record_tools
from danlu.data.render import IGNORE, RAW_ROLES, Sample
from danlu.errors import UserError
from danlu.files import atomic_write

if TYPE_CHECKING:
    from danlu.data.checkup import Inspection

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
_OPEN, _CLOSE = "⟦", "⟧"
_GREEN, _RESET = "\x1b[42;30m", "\x1b[0m"


# --------------------------------------------------------------------------- setup


def _split_inputs(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments → (files, ``key=value`` overrides); an existing path is always a file."""
    files, overrides = [], []
    for item in items:
        is_override = _OVERRIDE.match(item) and not Path(item).exists()
        (overrides if is_override else files).append(item)
    return files, overrides


def _data_config(args: argparse.Namespace) -> DataConfig:
    """The DataConfig for FILES, --template and data.* overrides (checked like a training config)."""
    files, overrides = _split_inputs([*args.inputs, *args.overrides])
    if not files:
        raise UserError("danlu data: give at least one data file, folder or glob")
    for item in overrides:
        if not item.startswith("data."):
            raise UserError(
                f"command line: '{item}' is not a data.* override; danlu data takes only data.KEY=VALUE"
            )
    head = [f"data.path={json.dumps(files)}"]  # a JSON list is YAML too, and quotes globs like a[12].jsonl
    if args.template is not None:
        head.append(f"data.template={json.dumps(args.template)}")
    return load_config(None, [*head, *overrides]).data


def _tokenizer(args: argparse.Namespace, cfg: DataConfig) -> tuple[Any, set[int]]:
    """The model's tokenizer (no weights) with data.template applied, and its stop token ids."""
    from danlu.data.templates import apply_template
    from danlu.model import load_tokenizer, resolve, stop_token_ids

    ref = resolve(args.model)
    tokenizer = load_tokenizer(ref)
    apply_template(tokenizer, cfg.template)
    return tokenizer, stop_token_ids(tokenizer, ref=ref)


# --------------------------------------------------------------------------- stats


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Mute a logger for a while: check reports placeholders itself, once per input."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _inspect_all(args: argparse.Namespace) -> list[Inspection]:
    """Every file of every input, read and tokenized as training would (bad records collected)."""
    from danlu.data.checkup import inspect  # torch: only when a verb runs

    cfg = _data_config(args)
    tokenizer, stop_ids = _tokenizer(args, cfg)
    with _quiet("danlu.data.dataset"):
        return [ins for entry in cfg.path for ins in inspect(cfg, entry, tokenizer, stop_ids)]


# --------------------------------------------------------------------------- verbs


def _print_reports(found: list[Inspection]) -> None:
    """Each file's report; then, where training would stop on these files, that as the error."""
    from danlu.data.checkup import report, stop_line

    for ins in found:
        print("\n".join(report(ins)), flush=True)
    stop = stop_line(found)
    if stop:
        raise UserError(stop)


def cmd_check(args: argparse.Namespace) -> int:
    if args.objective != "sft":
        return _preference(args, preview=False)
    _print_reports(_inspect_all(args))
    return 0


def _preference(args: argparse.Namespace, preview: bool) -> int:
    """``check`` / ``preview`` of preference data, read as ``train.objective=OBJECTIVE`` reads it."""
    from danlu.data import preference

    cfg = _data_config(args)
    tokenizer, stop_ids = _tokenizer(args, cfg)
    items, _, summary = preference.build(cfg, tokenizer, stop_ids, args.objective)
    if preview:
        print(preference.preview_text(items, tokenizer, limit=max(args.n, 0)))
        return 0
    what = "labelled replies (KTO)" if args.objective == "kto" else "preference pairs"
    line = summary.line().removeprefix(f"{summary.path}: ")
    print(f"{summary.path}\n  verdict:    {what} for train.objective={args.objective}: {line}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    found = _inspect_all(args)
    _print_reports(found)
    out = Path(args.out)
    groups = {ins.name: [len(s.input_ids) for s in ins.flat] for ins in found if not ins.refusal}
    plot_lengths(groups, found[0].max_length, args.bins, out)
    print(f"wrote {out}")
    return 0


def plot_lengths(groups: dict[str, list[int]], max_length: int, bins: int, out: Path) -> None:
    """A (stacked, one colour per input) histogram of sample lengths with a line at ``max_length``."""
    kind = out.suffix.lower().lstrip(".")
    if kind not in ("png", "svg", "pdf"):
        raise UserError(f"--out {out}: give a .png, .svg or .pdf file")
    try:
        from matplotlib.figure import Figure  # Agg through Figure: no pyplot, no global backend switch
    except ImportError:
        raise UserError("danlu data stats needs matplotlib: pip install matplotlib") from None
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no "generated new fontManager" chatter
    lengths = [n for values in groups.values() for n in values]
    cut = sum(n > max_length for n in lengths)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    ax.hist(list(groups.values()), bins=bins, stacked=True, label=list(groups))
    ax.axvline(max_length, color="crimson", linestyle="--", label=f"data.max_seq_length={max_length}")
    ax.set_xlabel("tokens per sample (untruncated)")
    ax.set_ylabel("samples")
    ax.set_title(f"{len(lengths)} samples, {cut} longer than {max_length} tokens (truncated)")
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format=kind), binary=True)


def cmd_preview(args: argparse.Namespace) -> int:
    if args.objective != "sft":
        return _preference(args, preview=True)
    cfg = _data_config(args)
    tokenizer, stop_ids = _tokenizer(args, cfg)
    from danlu.data.dataset import load_conversations, tokenize_records

    conversations = load_conversations(cfg)[0][: max(args.n, 0)]
    color = sys.stdout.isatty() and not args.plain
    legend = f"{_GREEN}green{_RESET}" if color else f"{_OPEN}in brackets{_CLOSE}"
    print(f"trained tokens are {legend}; text is decoded token by token from what the model sees")
    for (record, _), samples in tokenize_records(conversations, tokenizer, cfg, stop_ids):
        tools = record_tools(record)
        names = ", ".join(t["function"].get("name", "?") for t in tools or [])
        for k, sample in enumerate(samples):
            part = f" {k + 1}/{len(samples)}" if len(samples) > 1 else ""
            cut = f", truncated at {cfg.max_seq_length}" if sample.truncated else ""
            print(
                f"\n── {record.where()}{part} ({record.format}{f'; tools: {names}' if names else ''}): "
                f"{len(sample.input_ids)} tokens, {sample.trained_tokens} trained{cut} ──"
            )
            print(highlight(tokenizer, sample, color))
    return 0


def highlight(tokenizer: Any, sample: Sample, color: bool) -> str:
    """The decoded sample, each run of trained tokens coloured (``color``) or wrapped in ⟦ ⟧."""
    ids, trained = list(sample.input_ids), [int(x) != IGNORE for x in sample.labels]
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i < len(ids) and trained[i] == trained[start]:
            continue
        # decode whole runs: single tokens may hold half of a multi-byte character
        text = tokenizer.decode(ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if trained[start] and color:  # colour line by line so the background does not bleed
            text = "\n".join(f"{_GREEN}{part}{_RESET}" if part else "" for part in text.split("\n"))
        elif trained[start]:
            text = f"{_OPEN}{text}{_CLOSE}"
        out.append(text)
        start = i
    return "".join(out)


def cmd_convert(args: argparse.Namespace) -> int:
    cfg = _data_config(args)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite or choose another file")
    from danlu.data.dataset import load_conversations

    conversations = load_conversations(cfg)[0]
    rows = []
    for record, messages in conversations:
        if messages[0]["role"] in RAW_ROLES:
            raise UserError(
                f"{record.where()}: a {record.format} record has no chat turns, so it cannot be written "
                f"as {args.to} messages; leave {record.path} out of the conversion"
            )
        row: dict[str, Any] = {"messages": messages}
        tools = record_tools(record)
        if tools:
            row["tools"] = tools
        rows.append(json.dumps(row, ensure_ascii=False))
    atomic_write(out, lambda f: f.write("".join(line + "\n" for line in rows)))
    print(f"wrote {len(rows)} records to {out}")
    return 0


# --------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="FILES",
        help="data files, folders or globs (→ data.path); "
        "data.KEY=VALUE overrides may follow, e.g. data.max_seq_length=512 data.on_error=skip",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"whose tokenizer to use (default {DEFAULT_MODEL}); only the tokenizer is loaded",
    )
    p.add_argument("--template", default=None, help="chat template name or .jinja file (→ data.template)")
    p.set_defaults(overrides=[], objective="sft")


def _objective(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--objective",
        choices=["sft", "dpo", "orpo", "simpo", "kto"],
        default="sft",
        help="read the files as this train.objective does (default sft; dpo/orpo/simpo: preference "
        "pairs, kto: labelled replies)",
    )


def add_data_parser(sub: Any) -> None:
    """Register ``danlu data check|preview|stats|convert`` on the top-level subparsers."""
    p = sub.add_parser(
        "data",
        help="check, preview, plot or convert training data (tokenizer only)",
        description="Look at data the way training will, before spending GPU hours.",
    )
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = dsub.add_parser("check", help="formats, records, turns, token lengths, truncation and problems")
    _common(c)
    _objective(c)
    c.set_defaults(func=cmd_check)
    c = dsub.add_parser("preview", help="the exact rendered text of the first records, trained tokens marked")
    _common(c)
    _objective(c)
    c.add_argument("-n", type=int, default=3, help="how many records to show (default 3)")
    c.add_argument("--plain", action="store_true", help="mark trained tokens with ⟦ ⟧ instead of colour")
    c.set_defaults(func=cmd_preview)
    c = dsub.add_parser("stats", help="token-length histogram as an image, plus the check statistics")
    _common(c)
    c.add_argument("--out", required=True, help="image file to write (.png, .svg or .pdf)")
    c.add_argument("--bins", type=int, default=50, help="histogram bins (default 50)")
    c.set_defaults(func=cmd_stats)
    c = dsub.add_parser("convert", help="write a normalized JSON Lines copy as chat messages")
    _common(c)
    c.add_argument(
        "--to", choices=["openai"], required=True, help='output format: openai = {"messages": [...]}'
    )
    c.add_argument("--out", required=True, help="JSON Lines file to write")
    c.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    c.set_defaults(func=cmd_convert)
