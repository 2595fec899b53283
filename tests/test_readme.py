"""The README and docs/ stay true: the README short and starting with the two commands, every config
key documented, every source file in the file map, every link pointing at something that exists."""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from pathlib import Path

import pytest

from danlu.config import SECTIONS, load_config
from danlu.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_PATH = ROOT / "README.md"
README_MAX_LINES = 250


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def pages() -> list[Path]:
    """README.md and every docs/*.md page."""
    return [README_PATH, *sorted(DOCS.glob("*.md"))]


# ------------------------------------------------------------------ links

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where `[a](b)` is not a link."""
    return INLINE_CODE.sub("code", FENCE.sub("", text))


def links(text: str) -> list[str]:
    return LINK.findall(prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def dead_links(path: Path, text: str) -> list[str]:
    """Relative links in ``text`` (read from ``path``) whose file or heading does not exist."""
    dead = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if file_part and not dest.exists():
            dead.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md":
            dest_text = text if dest == path else read(dest)
            if fragment not in anchors(dest_text):
                dead.append(f"{target} (no heading #{fragment})")
    return dead


def test_link_checker_finds_dead_links(tmp_path):
    """The checker itself: a missing file or heading is reported; code is not mistaken for links."""
    (tmp_path / "there.md").write_text("# A `code` heading: yes\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page = tmp_path / "page.md"
    text = (
        "[ok](there.md) [ok](there.md#a-code-heading-yes) [ok](there.md#twice-1) [ok](#local) "
        "[web](https://example.com/x.md) ![img](there.md)\n\n## Local\n\n"
        "[gone](missing.md) [gone](there.md#nowhere) ![gone](pic.png) [gone](#not-here)\n\n"
        "```\n[not a link](nowhere.md)\n```\n`[nor](this.md)`\n"
    )
    assert dead_links(page, text) == [
        "missing.md (no such file)",
        "there.md#nowhere (no heading #nowhere)",
        "pic.png (no such file)",
        "#not-here (no heading #not-here)",
    ]


@pytest.mark.parametrize("path", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files_that_exist(path):
    dead = dead_links(path, read(path))
    assert not dead, f"{path.relative_to(ROOT)}: dead links {dead}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(read(README_PATH))}
    docs = sorted(DOCS.glob("*.md"))
    assert docs, "docs/ has no pages"
    unlinked = [p.relative_to(ROOT).as_posix() for p in docs if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


# ------------------------------------------------------------------ README


def test_readme_starts_with_the_two_commands():
    head = "\n".join(read(README_PATH).splitlines()[:6])
    assert "make demo" in head and "make test" in head


def test_readme_stays_short():
    n = len(read(README_PATH).splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}); move detail to docs/"
    )


def test_yaml_examples_are_valid_configs(tmp_path):
    """Every ```yaml block in the README and docs/ loads as a danlu config (no misspelled keys)."""
    blocks = [
        (path, m.group(1))
        for path in pages()
        for m in re.finditer(r"^```ya?ml\n(.*?)^```", read(path), re.S | re.M)
    ]
    assert blocks, "no YAML example in README.md or docs/"
    for i, (path, block) in enumerate(blocks):
        config = tmp_path / f"example{i}.yaml"
        config.write_text(block, encoding="utf-8")
        try:
            load_config(config)
        except UserError as e:
            pytest.fail(f"{path.relative_to(ROOT)}: YAML example is not a valid config: {e}")


# ------------------------------------------------------------------ reference pages


def test_config_reference_lists_every_key():
    text = read(DOCS / "config.md")
    missing = [
        f"{section}.{f.name}"
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if f"`{section}.{f.name}`" not in text
    ]
    assert not missing, f"docs/config.md config reference lacks {missing}"


def test_file_map_lists_every_source_file():
    text = read(DOCS / "architecture.md")
    files = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "src" / "danlu").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    ]
    assert files
    missing = [f for f in files if f"`{f}`" not in text]
    assert not missing, f"docs/architecture.md file map lacks {missing}"
