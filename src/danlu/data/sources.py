"""Data files, folders and globs → records, mixed by weight.

``data.path`` lists entries; each entry is a file, a folder (every data file inside) or a glob.
A file is read by what it holds: JSON arrays and JSON Lines whatever the extension says
(large sets ship JSON Lines named ``.json``), Parquet and CSV by extension, ``.txt`` and ``.md``
as plain text documents (one per file, or per blank-line-separated block with
``data.text_split=blank_line``). A folder or glob that holds data files leaves its ``.txt`` and
``.md`` files out (a README next to the data), saying so; one of text files only reads them all.
A file of records that are not SFT data (preference pairs, KTO) is refused as a whole. Each file's format
is detected from its first good record unless ``data.format`` names one, so an alpaca file
and a messages file mix. ``data.columns`` renames fields first; ``data.on_error`` decides
whether a bad record stops the run or is skipped and reported; ``data.weights`` repeats or
subsamples each entry.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from danlu.config import DataConfig
from danlu.data.formats import Message, Record, apply_columns, detect_format, to_messages
from danlu.data.kinds import NOT_SFT, sft_refusal
from danlu.errors import UserError

log = logging.getLogger(__name__)
RECORD_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = RECORD_SUFFIXES + TEXT_SUFFIXES
_KINDS = "a .json/.jsonl/.parquet/.csv file or .txt/.md text"
_WS = re.compile(r"[ \t\r\n]*")


@dataclass
class SkipReport:
    """Bad records left out under ``data.on_error=skip``: where each was and why."""

    items: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.items)

    def add(self, where: str, reason: str) -> None:
        self.items.append((where, reason))

    def line(self, limit: int = 5) -> str:
        if not self.items:
            return "no bad records"
        shown = ", ".join(f"{where} ({reason})" for where, reason in self.items[:limit])
        more = f", and {self.count - limit} more" if self.count > limit else ""
        return f"skipped {self.count} bad record{'s' if self.count != 1 else ''}: {shown}{more}"


# --------------------------------------------------------------------------- files


def expand(entry: str) -> list[Path]:
    """One ``data.path`` entry → data files: the file itself, a folder's files, or a glob's."""
    entry = os.path.expanduser(entry)
    path = Path(entry)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise UserError(f"data.path folder {entry} holds no .json/.jsonl/.parquet/.csv/.txt/.md files")
        return _text_beside_records(files, entry)
    if not any(c in entry for c in "*?["):
        raise UserError(f"data.path: {entry} not found; give {_KINDS}, a folder or a glob like data/*.jsonl")
    files: list[Path] = []
    for match in sorted(glob.glob(entry, recursive=True)):
        p = Path(match)
        files += _data_files(p) if p.is_dir() else [p] if p.suffix.lower() in SUFFIXES else []
    if not files:
        raise UserError(f"data.path: the glob {entry} matches no .json/.jsonl/.parquet/.csv/.txt/.md file")
    return _text_beside_records(files, entry)


def _text_beside_records(files: list[Path], entry: str) -> list[Path]:
    """``files`` without their .txt/.md files when there are record files too (a README next to
    the data is not training text); the log says which were left out."""
    text = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
    if not text or len(text) == len(files):
        return files
    log.warning(
        "data.path %s: left out %d .txt/.md file(s) next to the data files (%s); name them in data.path "
        "to train on them as text",
        entry,
        len(text),
        ", ".join(p.name for p in text[:3]) + (", ..." if len(text) > 3 else ""),
    )
    return [p for p in files if p.suffix.lower() not in TEXT_SUFFIXES]


def _data_files(folder: Path) -> list[Path]:
    """Data files under ``folder``, recursively and sorted; hidden files and folders are left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def read_file(path: Path, skipped: SkipReport | None = None, text_split: str = "file") -> list[Record]:
    """Read one data file into records (with their lines, or rows for Parquet).

    A malformed JSON Lines line or CSV row goes into ``skipped`` when one is given, else it
    raises; a file that cannot be read at all always raises. A ``.txt``/``.md`` file becomes
    ``{"text": ...}`` records: the whole file, or each blank-line-separated block
    (``text_split="blank_line"``).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file not found: {path} (set data.path to {_KINDS})")
    if path.is_dir():
        raise UserError(f"{path} is a folder; read it through data.path, which takes folders")
    suffix, before = path.suffix.lower(), skipped.count if skipped else 0
    if suffix == ".parquet":
        records = _read_parquet(path)
    elif suffix == ".csv":
        records = _read_csv(_decode(path), path, skipped)
    elif suffix in TEXT_SUFFIXES:
        records = _read_text(_decode(path), path, text_split)
    else:
        text = _decode(path)
        if not text.strip():
            raise UserError(f"{path}: the file is empty; it needs at least one record")
        if text.lstrip().startswith("["):
            records = _read_array(text, path)
        else:
            records = _read_lines(text, path, skipped)
    if not records and (skipped.count if skipped else 0) == before:  # else all were skipped
        raise UserError(f"{path}: the file holds no records; it needs at least one")
    return records


def _decode(path: Path) -> str:
    """UTF-8 text (BOM and CRLF allowed); anything else is an error naming the likely encoding."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        name = _guess_encoding(raw)
        fixed = f"{path.stem}.utf8{path.suffix}"
        if name is None:
            raise UserError(
                f"{path}:{line}: not UTF-8 text; save it as UTF-8, e.g. "
                f"`iconv -f ENCODING -t UTF-8 {path.name} > {fixed}`"
            ) from None
        codec = {"GBK": "gbk", "Big5": "big5", "Shift_JIS": "shift_jis", "UTF-16": "utf-16"}[name]
        raise UserError(
            f"{path}:{line}: not UTF-8 text, it looks like {name}; convert it: "
            f"`iconv -f {name} -t UTF-8 {path.name} > {fixed}` (or in Python: "
            f"Path('{fixed}').write_text(Path('{path.name}').read_text('{codec}'), 'utf-8'))"
        ) from None
    return text.replace("\r\n", "\n")


# Frequent characters (simplified and traditional) and CJK punctuation: text decoded with the
# wrong codec is mostly rare characters, so the codec that yields the most of these wins.
_COMMON = set(
    "的一是不了在人有我他这這个個们們中来來上大为為和国國地到以说說时時要就出会會可也你对對生能"
    "子那得于於着著下自之年过過发發后後作里裏用道行所然家事成方多经經么麼去学學如都同现現没沒"
    "请請问問题題答数數据據写寫给給，。？！：；、（）《》「」“”"
)


def _guess_encoding(raw: bytes) -> str | None:
    """The legacy encoding ``raw`` most likely is (GBK, Big5, Shift_JIS, UTF-16), or None."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    scored = []
    for rank, (name, codec) in enumerate([("GBK", "gb18030"), ("Big5", "big5"), ("Shift_JIS", "shift_jis")]):
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:
            continue
        hits = sum(1 for ch in text if ch in _COMMON or "\u3040" <= ch <= "\u30ff")  # kana for Japanese
        scored.append((hits, -rank, name))
    return max(scored)[2] if scored else None


def _read_array(text: str, path: Path) -> list[Record]:
    """A JSON array, element by element, so each record knows the line it starts on."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text, text.index("[") + 1).end()
    records: list[Record] = []
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}): {_snippet(text, e.pos)}") from None
        line += text.count("\n", counted, pos)
        counted = pos
        records.append(Record(item, str(path), line))
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            where = text.count("\n", 0, pos) + 1
            raise UserError(f"{path}:{where}: malformed JSON (expected ',' or ']'): {_snippet(text, pos)}")
    if pos >= len(text):
        raise UserError(f"{path}: the JSON array is never closed with ']'; is the file cut short?")
    rest = _WS.match(text, pos + 1).end()
    if rest < len(text):  # e.g. two arrays glued together: never drop records silently
        line = text.count("\n", 0, rest) + 1
        raise UserError(f"{path}:{line}: extra text after the JSON array: {_snippet(text, rest)}")
    if not records:
        raise UserError(f"{path}: the JSON array is empty; it needs at least one record")
    return records


def _read_lines(text: str, path: Path, skipped: SkipReport | None) -> list[Record]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(Record(json.loads(line), str(path), number))
        except json.JSONDecodeError as e:
            reason = f"malformed JSON Lines record ({e.msg}): {_snippet(line, e.pos)}"
            if number == 1 and text.lstrip().startswith("{") and _is_one_object(text):
                raise UserError(
                    f"{path}: the file is one JSON object, not records; put them in a JSON array "
                    "or one per line (JSON Lines)"
                ) from None
            if skipped is None:
                raise UserError(f"{path}:{number}: {reason}") from None
            skipped.add(f"{path}:{number}", reason)
    return records


def _read_text(text: str, path: Path, split: str) -> list[Record]:
    """A plain text file as documents: the whole file, or each block between blank lines."""
    if not text.strip():
        raise UserError(f"{path}: the file is empty; it needs some text")
    if split == "file":
        return [Record({"text": text.strip("\n")}, str(path), 1)]
    records: list[Record] = []
    block: list[str] = []
    start = 0
    for number, line in enumerate([*text.split("\n"), ""], start=1):
        if line.strip():
            start = start if block else number
            block.append(line)
        elif block:
            records.append(Record({"text": "\n".join(block)}, str(path), start))
            block = []
    return records


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _read_csv(text: str, path: Path, skipped: SkipReport | None) -> list[Record]:
    """CSV with a header row; empty cells count as missing. Lines are the file's own."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise UserError(f"{path}: the CSV file is empty; it needs a header row and at least one row")
    header = [h.strip() for h in header]
    records = []
    start = reader.line_num
    for row in reader:
        line, start = start + 1, reader.line_num  # a quoted cell may span several lines
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            reason = f"row has {len(row)} cells but the header has {len(header)}"
            if skipped is None:
                raise UserError(f"{path}:{line}: {reason}; quote cells that hold commas")
            skipped.add(f"{path}:{line}", reason)
            continue
        data = {k: v for k, v in zip(header, row, strict=False) if k and v != ""}
        records.append(Record(data, str(path), line))
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow as pa  # imported here: pyarrow takes a while to load
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    if not rows:
        raise UserError(f"{path}: the Parquet file has no rows; it needs at least one record")
    return [Record(row, str(path), i + 1) for i, row in enumerate(rows)]


def _snippet(text: str, pos: int, width: int = 40) -> str:
    piece = text[max(0, pos - width) : pos + width].replace("\n", "⏎")
    return repr(piece)


# ------------------------------------------------------------------------- records


def load_sources(
    cfg: DataConfig, paths: list[str] | None = None, weights: list[float] | None = None
) -> tuple[list[tuple[Record, list[Message]]], SkipReport]:
    """Read every entry of ``paths`` (default ``cfg.path``) into (record, messages) pairs.

    Records come back renamed by ``cfg.columns`` and with ``record.format`` set. ``weights``
    defaults to ``cfg.weights`` when ``paths`` is the default, else to 1 for each entry; weight
    ``w`` gives ``floor(w)`` copies of an entry plus a random ``w - floor(w)`` of it (seeded by
    ``cfg.seed`` and the entry's position). Copies share their objects: copy before mutating.
    """
    if paths is None:
        paths, weights = cfg.path, cfg.weights if weights is None else weights
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise UserError(
            "data.path is not set; give a .json/.jsonl/.parquet/.csv file, e.g. data.path=train.jsonl"
        )
    weights = list(weights or [1.0] * len(paths))
    if len(weights) != len(paths):
        raise UserError(
            f"data.weights has {len(weights)} values for {len(paths)} data.path entries; give one each"
        )
    if any(w < 0 for w in weights):
        raise UserError(f"data.weights must not be negative, got {weights}")
    skipped = SkipReport()
    out: list[tuple[Record, list[Message]]] = []
    for index, (entry, weight) in enumerate(zip(paths, weights, strict=True)):
        pairs = [pair for path in expand(entry) for pair in _load_file(path, cfg, skipped)]
        out += _weigh(pairs, weight, random.Random(cfg.seed + index))
    return out, skipped


def _load_file(path: Path, cfg: DataConfig, skipped: SkipReport) -> list[tuple[Record, list[Message]]]:
    """One file's good records as (record, messages); the format comes from its first good record."""
    skip = cfg.on_error == "skip"
    before = skipped.count
    records = read_file(path, skipped if skip else None, cfg.text_split)
    _refuse_not_sft(path, records, cfg)
    fmt = None if cfg.format == "auto" else cfg.format
    pairs = []
    for raw in records:
        record = apply_columns(raw, cfg.columns)
        try:
            record.format = fmt or detect_format(record)
            messages = to_messages(record, record.format)
            if record.format not in ("text", "completion"):
                _check_trained(record, messages, cfg.loss_on)
        except UserError as e:
            if not skip:
                raise UserError(f"{e}; record: {_short(raw.data)}") from None
            skipped.add(record.where(), str(e).removeprefix(f"{record.where()}: "))
            continue
        fmt = record.format
        pairs.append((record, messages))
    if not pairs:
        where, reason = skipped.items[before]
        raise UserError(f"{path}: all {skipped.count - before} records are bad, e.g. {where}: {reason}")
    return pairs


def _refuse_not_sft(path: Path, records: list[Record], cfg: DataConfig) -> None:
    """A file whose first record is preference or KTO data is refused whole, saying what it is."""
    for raw in records[:1]:
        record = apply_columns(raw, cfg.columns)
        try:
            fmt = detect_format(record)
        except UserError:
            return
        if fmt in NOT_SFT:
            n = len(records)
            raise UserError(f"{path}: {n} {fmt} record{'s' if n != 1 else ''}; {sft_refusal(fmt)}")


def _check_trained(record: Record, messages: list[Message], loss_on: str) -> None:
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        raise UserError(f"{record.where()}: record has no assistant reply to train on")
    if loss_on != "all" and not any(m.get("train", True) for m in replies):
        raise UserError(
            f"{record.where()}: every assistant reply has loss weight 0 (or train: false), so the "
            "record trains nothing"
        )


def _short(data: object, width: int = 80) -> str:
    text = json.dumps(data, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _weigh(pairs: list, weight: float, rng: random.Random) -> list:
    """``floor(weight)`` copies of ``pairs`` plus a random ``weight - floor(weight)`` of them, in order."""
    whole = math.floor(weight)
    k = round((weight - whole) * len(pairs))
    part = sorted(rng.sample(range(len(pairs)), k))
    return pairs * whole + [pairs[i] for i in part]
