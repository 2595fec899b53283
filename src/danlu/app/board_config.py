"""``danlu board``'s config side, kept free of Gradio so it is testable on its own: presets, the
run's YAML edited one key at a time, the form fields beginners change, the command lines the
board runs, and reading what those commands print (their one-line errors, ``danlu plan``'s
verdict, ``danlu data preview``'s marked text).

Light on purpose (yaml and the config schema only): ``danlu --help`` imports the board's parser.
"""

from __future__ import annotations

import copy
import dataclasses
import html
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from danlu.config import Config, load_config
from danlu.errors import UserError

PRESETS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "identity"
DEFAULT_PROMPTS = ["你是谁？", "Who are you?"]
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_PLACEHOLDER_SCAN = 4 * 2**20  # placeholders are looked for in the first 4 MiB of each file

# the form: field name -> the config key it edits
FIELDS = {
    "method": "train.method",
    "objective": "train.objective",
    "rank": "lora.r",
    "steps": "train.max_steps",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "max_length": "data.max_seq_length",
    "quantization": "model.quantization",
    "packing": "data.packing",
    "save_every": "train.save_every",
    "prompts": "train.eval_prompts",
    "sample_every": "train.sample_every",
}
# data.* keys `danlu data` takes as overrides, so its verdict is the one training will see
DATA_KEYS = (
    "max_seq_length",
    "format",
    "columns",
    "on_error",
    "loss_on",
    "system",
    "placeholders",
    "replace",
)


# ------------------------------------------------------------------------------ presets


def presets() -> dict[str, str]:
    """Preset name -> its one-line description (the file's first comment), as `danlu configs list`."""
    out = {}
    for path in sorted(PRESETS.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        out[path.stem] = first.lstrip("# ").strip()
    return out


def bundled_data() -> dict[str, Path]:
    """The data files shipped with the presets (identity.json, ...), by file name."""
    return {p.name: p for p in sorted(PRESETS.iterdir()) if p.suffix in DATA_SUFFIXES}


def preset_config(name: str) -> dict:
    """A preset as a plain mapping, its bundled data paths made absolute (they live in the package)."""
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"no preset named '{name}'; known: {', '.join(presets())}")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data = cfg.setdefault("data", {})
    paths = data.get("path", [])
    data["path"] = [
        str(PRESETS / p) if (PRESETS / p).exists() else p
        for p in ([paths] if isinstance(paths, str) else paths)
    ]
    return cfg


KEPT = ("model.path", "data.path", "data.placeholders", "output.dir")  # what a preset does not replace


def board_config(name: str, current: dict | None = None) -> dict:
    """The board's starting point: the preset, with sample questions answered during training (they
    show up as the run goes); from ``current``, the model and data chosen in steps 1 and 2 and the
    run's output folder are kept."""
    cfg = preset_config(name)
    train = cfg.setdefault("train", {})
    if not train.get("eval_prompts"):
        train["eval_prompts"] = list(DEFAULT_PROMPTS)
    if not train.get("sample_every") and train.get("max_steps"):
        train["sample_every"] = max(1, int(train["max_steps"]) // 3)
    for key in KEPT:
        if get(current or {}, key):
            cfg = put(cfg, key, get(current or {}, key))
    return cfg


# --------------------------------------------------------------------------- the YAML


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)


def parse(text: str) -> dict:
    """The editor's YAML as a mapping; a syntax error is one line naming the line."""
    try:
        cfg = yaml.safe_load(text or "")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config{where}: not valid YAML ({problem})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UserError("config: expected a mapping of sections (model, data, lora, train, output)")
    return cfg


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def put(cfg: dict, dotted: str, value: Any) -> dict:
    """A copy of ``cfg`` with ``dotted`` set (sections made as needed; None removes the key)."""
    out = copy.deepcopy(cfg)
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    return out


def default(dotted: str) -> Any:
    """The schema's default for ``section.key``."""
    section, key = dotted.split(".", 1)
    return getattr(getattr(Config(), section), key)


def form_values(cfg: dict) -> dict[str, Any]:
    """What the form shows for ``cfg``: each field of :data:`FIELDS` (the schema's default where the
    config is silent), plus the model, the data files, the placeholders and the output folder."""
    values = {field: get(cfg, key, default(key)) for field, key in FIELDS.items()}
    values["steps"] = values["steps"] or 0
    values["lr"] = f"{float(values['lr']):g}"
    values["prompts"] = "\n".join(values["prompts"] or [])
    values["model"] = str(get(cfg, "model.path", default("model.path")))
    paths = get(cfg, "data.path", [])
    values["data"] = "\n".join([paths] if isinstance(paths, str) else paths)
    values["placeholders"] = {str(k): str(v) for k, v in (get(cfg, "data.placeholders") or {}).items()}
    values["output"] = str(get(cfg, "output.dir", default("output.dir")))
    return values


def set_field(cfg: dict, field: str, value: Any) -> dict:
    """``cfg`` with one form field's value written to its key, converted as the schema wants."""
    if field == "model":
        return put(cfg, "model.path", str(value).strip() or default("model.path"))
    if field == "data":
        return put(cfg, "data.path", data_paths(value))
    if field == "output":
        return put(cfg, "output.dir", str(value).strip())
    if field == "placeholders":
        for key, text in value.items():
            cfg = put(cfg, f"data.placeholders.{key}", text)
        return cfg
    if field == "steps":
        value = int(value) if value else None  # 0 or empty: train for train.epochs instead
    elif field == "lr":
        try:
            value = float(str(value).strip())
        except ValueError:
            raise UserError(f"learning rate {value!r}: give a number such as 2e-4") from None
    elif field == "prompts":
        value = [line.strip() for line in str(value).splitlines() if line.strip()]
    elif field in ("rank", "max_length", "save_every", "sample_every"):
        value = int(value or 0)
    elif field == "epochs":
        value = float(value or 0)
    return put(cfg, FIELDS[field], value)


def merge_form(text: str, base: dict[str, Any], form: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The YAML with the fields the user changed since ``base`` (what the form showed when it last
    matched the YAML) written in, and the new base. Every edit carries the whole form, so edits
    made at once never undo each other, and a YAML edited by hand keeps what no field changed."""
    cfg = parse(text)
    new = cfg
    for field, value in form.items():
        if value != base.get(field):
            new = set_field(new, field, value)
    return (text if new == cfg else dump(new)), form_values(new)


def next_name(runs: Path, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... : the first name no run or board config in ``runs`` has."""
    n = 1
    while True:
        name = base if n == 1 else f"{base}-{n}"
        if not (runs / name).exists() and not (runs / f"{name}.yaml").exists():
            return name
        n += 1


def write_run_config(text: str, runs: Path, name: str) -> Path:
    """Write the editor's YAML as ``RUNS/NAME.yaml`` with ``output.dir: RUNS/NAME`` and check it as
    `danlu train` will (a mistake is its one line); refuse a name whose folder already holds a run."""
    name = name.strip()
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"run name {name!r}: give a plain folder name such as identity-2")
    out = runs / name
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already holds a run: choose another run name, or pick it and press Resume")
    cfg = put(parse(text), "output.dir", str(out))
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{name}.yaml"
    path.write_text(dump(cfg), encoding="utf-8")
    try:
        load_config(path)
    except UserError:
        path.unlink()
        raise
    return path


# ------------------------------------------------------------------------------- data


def data_paths(text: str) -> list[str]:
    """Data files from the path box: one per line (or separated by commas)."""
    return [p.strip() for p in re.split(r"[\n,]", text or "") if p.strip()]


def placeholders_in(paths: list[str]) -> list[str]:
    """``{{key}}`` placeholders in the data files, in order of first appearance."""
    found: dict[str, None] = {}
    for p in paths:
        path = Path(p)
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.suffix.lower() == ".parquet" or not f.is_file():
                continue
            with open(f, encoding="utf-8", errors="replace") as fh:
                text = fh.read(_PLACEHOLDER_SCAN)
            for key in _PLACEHOLDER.findall(text):
                found.setdefault(key, None)
    return list(found)


def data_overrides(cfg: dict) -> list[str]:
    """The config's data settings as `danlu data` overrides (``data.placeholders.name=Ada`` ...)."""
    out = []
    for key in DATA_KEYS:
        value = get(cfg, f"data.{key}")
        if value is None or value == {} or value == default(f"data.{key}"):
            continue
        if isinstance(value, dict):
            out += [f"data.{key}.{k}={v}" for k, v in value.items()]
        else:
            out.append(f"data.{key}={value}")
    return out


# ------------------------------------------------------------------------- command lines


def shown(args: list[str]) -> str:
    """The command line as a user would type it."""
    return "danlu " + shlex.join(args)


def train_args(config: Path | str, resume: bool = False) -> list[str]:
    return ["train", str(config), "--no-progress", *(["--resume"] if resume else [])]


def plan_args(config: Path | str, gpu_mem: str = "") -> list[str]:
    return ["plan", str(config), *(["--gpu-mem", gpu_mem.strip()] if gpu_mem.strip() else [])]


def data_args(action: str, paths: list[str], cfg: dict, *extra: str) -> list[str]:
    """``danlu data ACTION`` on ``paths`` as the run in ``cfg`` reads them (``check`` and ``preview``
    the objective's way: preference pairs or KTO labels)."""
    objective = objective_of(cfg)
    if objective != "sft" and action in ("check", "preview"):
        extra = (*extra, "--objective", objective)
    args = ["data", action, *paths, "--model", str(get(cfg, "model.path", default("model.path")))]
    template = get(cfg, "data.template")
    return [*args, *(["--template", str(template)] if template else []), *extra, *data_overrides(cfg)]


def objective_of(cfg: dict) -> str:
    return str(get(cfg, "train.objective", default("train.objective")))


def merge_args(final: Path, out: Path) -> list[str]:
    return ["merge", "--adapter", str(final), "--out", str(out), *(["--overwrite"] if out.exists() else [])]


def gguf_args(model: Path, out: Path, qtype: str, target: str = "gguf") -> list[str]:
    """``danlu export gguf`` (or ``export ollama``: the GGUF plus OUT_STEM.Modelfile next to it)."""
    written = [out, out.with_suffix(".Modelfile")] if target == "ollama" else [out]
    overwrite = ["--overwrite"] if any(p.exists() for p in written) else []
    return ["export", target, "--model", str(model), "--out", str(out), "--type", qtype, *overwrite]


def serve_args(name: str, final: Path, port: int, adapter: bool) -> list[str]:
    model = ["--adapter", f"{name}={final}"] if adapter else ["--model", str(final)]
    return ["serve", *model, "--port", str(port)]


# --------------------------------------------------------------------- what commands print


def cli_error(text: str) -> str | None:
    """The one line a failed command leaves: the CLI's ``danlu: error: ...``, else (a crash) the
    last line of its traceback; None when there is neither."""
    lines = [line.rstrip() for line in (text or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("danlu: error:")]
    if errors:
        return errors[-1]
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return None


def failure(rc: int, err: str) -> str:
    """The one line for a command that exited with ``rc``: its error line, else its last line."""
    lines = [line for line in (err or "").splitlines() if line.strip()]
    return cli_error(err) or (lines[-1].strip() if lines else f"the command exited with code {rc}")


@dataclasses.dataclass
class Verdict:
    """``danlu plan``'s answer: fits (True/False, None without a budget), its line, what to change."""

    fits: bool | None
    line: str
    suggestions: list[str]


def plan_verdict(out: str) -> Verdict:
    lines = [line.strip() for line in out.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("fits:"):
            return Verdict(True, line, [])
        if line.startswith("does not fit:"):
            rest = [x for x in lines[i + 1 :] if x and not x.startswith("to fit")]
            options = [x.split("→")[0].strip() for x in rest if "=" in x.split("→")[0]]
            return Verdict(False, line, options if options else rest[:1])
        if line.startswith("no CUDA GPU here"):
            return Verdict(None, line, [])
    return Verdict(None, lines[-1] if lines else "", [])


def apply_overrides(cfg: dict, line: str) -> dict:
    """``cfg`` with a suggestion's ``key=value`` pairs set (values read as YAML: ``true``, ``16``)."""
    for item in line.split():
        if "=" not in item:
            continue
        key, value = item.split("=", 1)
        cfg = put(cfg, key, yaml.safe_load(value))
    return cfg


def preview_html(out: str) -> str:
    """`danlu data preview --plain` as HTML: each record a block, trained tokens (⟦…⟧) highlighted."""
    body = html.escape(out)
    body = re.sub(r"⟦(.*?)⟧", r'<mark class="trained">\1</mark>', body, flags=re.S)
    return f'<pre class="danlu-preview">{body}</pre>'
