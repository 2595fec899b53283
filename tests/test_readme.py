"""The README stays true: every config key documented, every source file in the file map."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from danlu.config import SECTIONS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_starts_with_the_two_commands():
    head = "\n".join(README.splitlines()[:6])
    assert "make demo" in head and "make test" in head


def test_config_reference_lists_every_key():
    missing = [
        f"{section}.{f.name}"
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if f"`{section}.{f.name}`" not in README
    ]
    assert not missing, f"README config reference lacks {missing}"


def test_file_map_lists_every_source_file():
    files = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "src" / "danlu").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    ]
    missing = [f for f in files if f"`{f}`" not in README]
    assert not missing, f"README file map lacks {missing}"
