"""Small file utilities every layer may use: where danlu keeps its cache, and writes that never
leave half a file or half a folder behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def danlu_home() -> Path:
    """The cache root: ``$DANLU_HOME`` or ``~/.cache/danlu``."""
    return Path(os.environ.get("DANLU_HOME") or Path.home() / ".cache" / "danlu")


def atomic_dir(target: Path, write: Callable[[Path], Any]) -> None:
    """Write into a temporary sibling folder, then rename: a crash never leaves half a folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(out: Path, write: Callable[[IO], Any], binary: bool = False) -> None:
    """Write through a temp file in the same folder, then rename: never a half-written ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
