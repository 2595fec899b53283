"""Tokenized data, cached on disk and keyed by everything that went into it.

The key hashes the bytes of every input file, the tokenizer (its full serialised form and
chat template), the stop tokens, every data setting that changes the result, and
:data:`VERSION` (bumped when rendering changes). A second run with the same inputs loads flat
``.npy`` arrays memory-mapped in well under a second instead of tokenizing again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from danlu.config import DataConfig
from danlu.data.render import Sample
from danlu.files import danlu_home

VERSION = 1
# Settings that do not change the tokenized result.
_NOT_IN_KEY = {"cache", "num_proc"}


def root() -> Path:
    return danlu_home() / "data"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps(
        [tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token, type(tokenizer).__name__]
    )
    return hashlib.sha256((text + extra).encode()).hexdigest()


def key(cfg: DataConfig, tokenizer: Any, stop_ids: set[int]) -> str:
    """The cache key for tokenizing ``cfg`` with ``tokenizer``."""
    from danlu.data.sources import expand

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    files = [[str(p), _file_digest(p)] for entry in [*cfg.path, *cfg.eval_path] for p in expand(entry)]
    blob = json.dumps(
        [VERSION, settings, files, _tokenizer_digest(tokenizer), sorted(stop_ids)], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _write_split(folder: Path, name: str, samples: list[Sample]) -> None:
    lengths = np.asarray([len(s.input_ids) for s in samples], np.int64)
    np.save(folder / f"{name}_lengths.npy", lengths)
    np.save(folder / f"{name}_truncated.npy", np.asarray([s.truncated for s in samples], bool))
    for field in ("input_ids", "labels", "position_ids"):
        if field == "position_ids" and (not samples or samples[0].position_ids is None):
            continue
        flat = (
            np.concatenate([np.asarray(getattr(s, field), np.int32) for s in samples])
            if samples
            else np.zeros(0, np.int32)
        )
        np.save(folder / f"{name}_{field}.npy", flat)


def _read_split(folder: Path, name: str) -> list[Sample]:
    lengths = np.load(folder / f"{name}_lengths.npy")
    truncated = np.load(folder / f"{name}_truncated.npy")
    ids = np.load(folder / f"{name}_input_ids.npy", mmap_mode="r")
    labels = np.load(folder / f"{name}_labels.npy", mmap_mode="r")
    pos_file = folder / f"{name}_position_ids.npy"
    positions = np.load(pos_file, mmap_mode="r") if pos_file.exists() else None
    ends = np.cumsum(lengths)
    return [
        Sample(
            ids[e - n : e], labels[e - n : e], bool(t), None if positions is None else positions[e - n : e]
        )
        for e, n, t in zip(ends, lengths, truncated, strict=True)
    ]


def save(cache_key: str, train: list[Sample], evals: list[Sample], summary: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves no entry, never a broken one. ``summary``: the
    data summary as a JSON-able dict."""
    target = root() / cache_key
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_key}-", dir=target.parent))
    try:
        _write_split(tmp, "train", train)
        _write_split(tmp, "eval", evals)
        (tmp / "summary.json").write_text(json.dumps(summary, ensure_ascii=False))
        if not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(cache_key: str) -> tuple[list[Sample], list[Sample], dict[str, Any]] | None:
    """The cached samples and the summary dict, or None when absent."""
    folder = root() / cache_key
    if not (folder / "summary.json").is_file():
        return None
    summary = json.loads((folder / "summary.json").read_text())
    return _read_split(folder, "train"), _read_split(folder, "eval"), summary
