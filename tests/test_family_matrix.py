"""The family matrix (issue 22): every model family the seeds and today's users bring, through every
stage as a user runs it: right, or refused in one line; never a traceback, never silently wrong.

Each family is a tiny random model of its real architecture class with its real tokenizer
(llama.cpp's vocab files, ``make vocab``; ``tests/vocab.py``), its chat template and the stop ids
of the generation_config.json it ships. Every stage is one ``danlu`` command through
``danlu.app.cli.main``: ``data check`` (single-turn and multi-turn data), ``train`` (LoRA, then
packing on, then QLoRA nf4), ``chat`` (greedy, a few tokens), ``merge``, ``export gguf`` and
``serve`` (one request through the app). A cell either succeeds and what it made is checked on its
own terms (the turn's stop token reaches chat, serve and the merged model; the GGUF's metadata,
vocabulary and logits match the merged model), or is refused: exit code 2 and one stderr line
``danlu: error: ...``. Anything else (a traceback, an unclean refusal, a failed check) fails.

:data:`EXPECTED` is the matrix as measured, and docs/models.md shows it (checked below). A cell
that was ✓ and no longer is fails; one that changes otherwise (a gap closed, a reworded refusal)
is listed at the end of the run, with the whole measured matrix (also in build/family-matrix.md),
so that EXPECTED and the docs are updated together.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vocab
from family_stages import STAGES, Outcome, Run
from vocab import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
MISSING = vocab.missing()
needs_vocab = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


# The matrix as measured: "✓", "✓ (which loss trained)", "refused: the refusal's first clause",
# "— (needs STAGE)", or "WRONG: what the check found" for a known bug (the run then passes only
# while the cell stays wrong in exactly that way; docs/models.md lists it as wrong).
PADDING_FREE, CHUNKED = "✓ (padding-free)", "✓ (chunked loss)"


def row(trained: str, **cells: str) -> dict[str, str]:
    """A family's row: every stage ✓ (training with ``trained``'s loss) but ``cells``."""
    every = {s: "✓" for s in STAGES} | {"LoRA": trained, "packing": trained, "QLoRA": trained}
    return every | {s.replace("_", "-"): cell for s, cell in cells.items()}


EXPECTED: dict[str, dict[str, str]] = {
    "llama2": row(PADDING_FREE),
    "llama3": row(PADDING_FREE),
    "qwen2.5": row(PADDING_FREE),
    "qwen3": row(PADDING_FREE),
    "phi3": row(PADDING_FREE),
    "mistral": row(PADDING_FREE),
    "gemma4": row(CHUNKED, GGUF="refused: cannot export Gemma4ForCausalLM to GGUF"),
    "bloom": row(
        CHUNKED,
        packing="refused: data.packing=true: BloomForCausalLM ignores the restarting positions, so packed samples "
        "would attend to each other (measured on this model: 100% of a joined sequence's effect)",
    ),
    "falcon": row(CHUNKED),
}


# ---------------------------------------------------------------------- the matrix itself


class Summary:
    """Prints the measured matrix at the end of the pytest run (a plugin registered at run time)."""

    def __init__(self, results: dict[str, dict[str, Outcome]], changes: list[str]) -> None:
        self.results, self.changes = results, changes

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.results:
            return
        terminalreporter.section("family matrix (tests/test_family_matrix.py)")
        terminalreporter.write_line(measured_table(self.results))
        for change in self.changes:
            terminalreporter.write_line(f"changed since EXPECTED (update it and docs/models.md): {change}")


@pytest.fixture(scope="module")
def matrix(request):
    results: dict[str, dict[str, Outcome]] = {}
    changes: list[str] = []
    request.config.pluginmanager.register(Summary(results, changes), "danlu-family-matrix")
    yield results, changes
    if results:
        out = ROOT / "build" / "family-matrix.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(measured_table(results) + "\n", encoding="utf-8")
        cells = {key: {s: o.cell() for s, o in outcomes.items()} for key, outcomes in results.items()}
        out.with_suffix(".json").write_text(
            json.dumps(cells, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def measured_table(results: dict[str, dict[str, Outcome]]) -> str:
    return matrix_table(
        {key: {s: o.cell() for s, o in outcomes.items()} for key, outcomes in results.items()}
    )


COLUMNS = {
    "data": "data check",
    "multi-turn": "multi-turn data",
    "LoRA": "LoRA (loss)",
    "packing": "packing",
    "QLoRA": "QLoRA nf4",
    "chat": "chat",
    "merge": "merge",
    "GGUF": "GGUF",
    "serve": "serve",
}


def matrix_table(cells: dict[str, dict[str, str]]) -> str:
    """Family × stage, a cell per stage (as :data:`EXPECTED` writes them)."""
    names = {f.key: f.name for f in FAMILIES}
    lines = [f"| family | {' | '.join(COLUMNS[s] for s in STAGES)} |", "|---" * (len(STAGES) + 1) + "|"]
    for key, row in cells.items():
        shown = [esc(row.get(s, "?").replace("WRONG:", "✗ wrong:")) for s in STAGES]
        lines.append(f"| {names[key]} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def esc(cell: str) -> str:
    return cell.replace("|", "\\|")  # a pipe inside a table cell, even in backticks, must be escaped


def families_table() -> str:
    """What each family of the matrix is made of."""
    lines = [
        "| family | architecture | tokenizer | chat template | stop ids (generation_config.json) | note |",
        "|---|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        tokenizer = f"`ggml-vocab-{f.vocab}.gguf`" if f.vocab else "SmolLM2's (the embedded default's)"
        if f.template == "own":
            template = "the tokenizer's own" + ("" if f.vocab is None else " (in the vocab file)")
        elif f.template.startswith("file:"):
            template = f"`{f.template[5:]}` (llama.cpp's copy)"
        else:
            template = f"danlu's `{f.template}`"
        stops = ", ".join(map(str, f.stops)) or "— (the tokenizer's EOS)"
        cells = [f.name, f.arch, tokenizer, template, f"{stops}; turns end with `{f.turn_end}`", f.note]
        lines.append("| " + " | ".join(esc(c) for c in cells) + " |")
    return "\n".join(lines)


@needs_vocab
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES, ids=[f.key for f in FAMILIES])
def test_family(family, matrix, default_model_dir, tmp_path, capsys, caplog, monkeypatch):
    results, changes = matrix
    turn_end = vocab.build(family, tmp_path / "model", default_model_dir)
    outcomes = Run(family, tmp_path / "model", turn_end, tmp_path, capsys, caplog, monkeypatch).all()
    results[family.key] = outcomes
    expected = EXPECTED.get(family.key, {})
    wrong = {s: o.text for s, o in outcomes.items() if o.kind == "wrong" and o.cell() != expected.get(s)}
    assert not wrong, f"{family.name}: " + json.dumps(wrong, indent=1, ensure_ascii=False)
    lost = {
        s: (expected.get(s), o.cell())
        for s, o in outcomes.items()
        if expected.get(s, "").startswith("✓") and o.kind != "ok"
    }
    assert not lost, f"{family.name}: cells that worked no longer do (expected, measured): {lost}"
    changes += [
        f"{family.name} {s}: {expected.get(s)!r} → {o.cell()!r}"
        for s, o in outcomes.items()
        if o.cell() != expected.get(s)
    ]


def test_docs_show_the_matrix():
    """docs/models.md holds both tables as this file has them: the families, and EXPECTED."""
    docs = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    assert families_table() in docs, "docs/models.md: paste families_table() in place of the families table"
    assert matrix_table(EXPECTED) in docs, (
        "docs/models.md: paste matrix_table(EXPECTED) in place of the matrix"
    )
