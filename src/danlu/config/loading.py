"""Reading a config: YAML/JSON files, dotted ``key=value`` overrides, type coercion, saving.

Values are checked against the declared types when loaded, and every mistake is a
:class:`UserError` naming the file, line and key, with a suggestion where one exists (the
closest key, or the name danlu uses for another trainer's key).

Relative paths in a config file are looked up next to that file first, then in the current
folder; paths given on the command line are relative to the current folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from danlu.config.checks import validate
from danlu.config.schema import SECTIONS, Config, describe_type
from danlu.errors import UserError


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (YAML or JSON; None for defaults) and apply ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p} (list presets with `danlu configs list`)")
        raw, lines = _read_mapping(p)
        for dotted, value in _flatten(raw, lines, p):
            _assign(cfg, dotted, value, where=_where(p, lines.get(dotted)), base=p.parent)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"command line: override '{item}' must look like key=value, e.g. train.lr=1e-4")
        dotted, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:  # not YAML (e.g. "[Who are you?, x]"): take it as plain text
            value = text
        _assign(cfg, dotted.strip(), value, where="command line", base=None)
    validate(cfg)
    return cfg


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)


def _read_mapping(path: Path) -> tuple[dict, dict[str, int]]:
    """Parse a YAML/JSON file into a dict plus the 1-based line of every dotted key."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{line}: not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (model, data, lora, train, output)")
    lines: dict[str, int] = {}
    try:  # JSON is YAML too, so one walk gives line numbers for both
        _key_lines(yaml.compose(text, Loader=yaml.SafeLoader), "", lines)
    except yaml.YAMLError:
        pass
    return data, lines


def _key_lines(node: Any, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            out[dotted] = key_node.start_mark.line + 1
            _key_lines(value_node, dotted + ".", out)


def _flatten(raw: dict, lines: dict[str, int], path: Path) -> list[tuple[str, Any]]:
    """Turn ``{train: {lr: 1}}`` into ``[("train.lr", 1)]``; dict-typed fields stay whole."""
    items: list[tuple[str, Any]] = []
    for section, body in raw.items():
        if section in SECTIONS and body is not None and not isinstance(body, dict):
            raise UserError(f"{_where(path, lines.get(section))}: section '{section}' must be a mapping")
        if section not in SECTIONS or body is None:
            items.append((str(section), body))
            continue
        for key, value in body.items():
            items.append((f"{section}.{key}", value))
    return items


def _assign(cfg: Config, dotted: str, value: Any, *, where: str, base: Path | None) -> None:
    parts = dotted.split(".")
    section = parts[0]
    if section not in SECTIONS:
        raise UserError(f"{where}: unknown section '{section}'{_suggest(section, SECTIONS)}")
    if len(parts) == 1:
        raise UserError(
            f"{where}: '{section}' is a section; set a key such as {section}.{_first_key(section)}=..."
        )
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    key = parts[1]
    if key not in hints:
        known = [f"{section}.{k}" for k in hints]
        hint = (
            f"; did you mean '{_SYNONYMS[key]}'?" if key in _SYNONYMS else _suggest(f"{section}.{key}", known)
        )
        raise UserError(f"{where}: unknown key '{section}.{key}'{hint}")
    full = f"{section}.{key}"
    if len(parts) > 2:  # data.placeholders.name=Ada sets one entry of a dict field
        if typing.get_origin(hints[key]) is not dict:
            raise UserError(f"{where}: '{full}' has no sub-keys; set it as {full}=VALUE")
        current = dict(getattr(obj, key))
        current[".".join(parts[2:])] = _coerce(value, typing.get_args(hints[key])[1], full, where)
        setattr(obj, key, current)
        return
    value = _coerce(value, hints[key], full, where)
    meta = {f.name: f.metadata for f in dataclasses.fields(obj)}[key]
    if meta.get("path") and base is not None:
        value = [_near(base, v) for v in value] if isinstance(value, list) else _near(base, value)
    setattr(obj, key, value)


def _near(base: Path, value: str) -> str:
    """A relative path (or glob) that exists next to the config file resolves there."""
    if not value or Path(value).is_absolute():
        return value
    candidate = base / value
    is_glob = any(c in value for c in "*?[")
    if candidate.exists() or (is_glob and next(iter(base.glob(value)), None) is not None):
        return str(candidate.resolve())
    return value


# Names other trainers (Hugging Face Trainer, PEFT) use for our keys. Spelling similarity alone
# gets these wrong: it offers train.warmup_ratio for train.learning_rate.
_SYNONYMS = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.scheduler",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "output_dir": "output.dir",
}


def _first_key(section: str) -> str:
    return dataclasses.fields(SECTIONS[section])[0].name


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(choices)}"


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against ``tp``, converting the obvious cases (``'2e-4'`` to a float)."""
    origin = typing.get_origin(tp)
    fail = UserError(f"{where}: {key} must be {describe_type(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except UserError:
                continue
        raise fail
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("off" if not value else "on") in choices:
            return "off" if not value else "on"  # YAML 1.1 reads a bare off/on as a boolean
        if value in choices:
            return value
        raise UserError(
            f"{where}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}"
            f"{_suggest(str(value), [str(c) for c in choices]) if isinstance(value, str) else ''}"
        )
    if origin is list:
        (inner,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, inner, key, where) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail
        inner = typing.get_args(tp)[1]
        return {str(k): _coerce(v, inner, f"{key}.{k}", where) for k, v in value.items()}
    if tp in (bool, int, float, str):
        return _coerce_scalar(value, tp, fail)
    if tp is Any:  # passed on as written (data.template_kwargs: booleans stay booleans)
        return value
    raise TypeError(f"unsupported config type {tp}")


def _coerce_scalar(value: Any, tp: type, fail: UserError) -> Any:
    """A bool, int, float or str, from text too where the text plainly spells one."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise fail
    if tp is int:
        if isinstance(value, bool):
            raise fail
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise fail
    if tp is float:
        if isinstance(value, bool):
            raise fail
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads 2e-4 as text; people mean a number
                return float(value)
            except ValueError:
                pass
        raise fail
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):  # tp is str
        return str(value)
    raise fail


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
