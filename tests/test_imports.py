"""The house rules of ``src/danlu``: data flows one way and no module imports itself back.

config → data → model → train → export → infer → app: a module imports only from its own layer
or those to its left, and no chain of imports (lazy ones inside functions included) comes back
to where it started. Read from the source with :mod:`ast`; nothing is imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

# each module's layer, by the longest matching prefix; a module may import its layer and those before it
LAYERS = [
    ("base", ["danlu", "danlu.errors", "danlu.files", "danlu.config"]),
    ("data", ["danlu.data"]),
    ("model", ["danlu.model"]),
    (
        "train",
        [
            "danlu.fast",
            "danlu.methods",
            "danlu.checkpoint",
            "danlu.distributed",
            "danlu.zero",
            "danlu.tracking",
        ]
        + ["danlu.plan", "danlu.train", "danlu.bench", "danlu.bench_cases"]
        + ["danlu.recipe", "danlu.objectives", "danlu.preference", "danlu.bench_dpo", "danlu.bench_parts"],
    ),
    ("export", ["danlu.export"]),
    ("infer", ["danlu.infer"]),
    ("app", ["danlu.app", "danlu.__main__"]),
]


def module_names() -> dict[str, Path]:
    names = {}
    for path in (SRC / "danlu").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"{module} has no layer in tests/test_imports.py: add it to LAYERS")
    return rank


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the danlu modules it imports anywhere in its file (the most specific that exist)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                    ).strip(".")
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("danlu") and target != name:
                    found.add(target)
        # `from danlu.x import y` names both x and x.y; keep y only when it is a module
        graph[name] = found
    return graph


GRAPH = imports(module_names())


def test_every_import_goes_with_the_flow():
    against = sorted(
        f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
        for a, targets in GRAPH.items()
        for b in targets
        if layer(b) > layer(a) and not b.startswith(a + ".")  # a package may import its own modules
    )
    assert not against, "imports against config → data → model → train → export → infer → app:\n" + "\n".join(
        against
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exporting its modules is not a circle with them."""
    return {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in graph.items()}


def test_no_import_circles():
    assert cycles(without_package_inits(GRAPH)) == []


def test_the_checks_see_a_circle_and_a_wrong_way_import():
    """The two checks above can fail: a made-up circle and an import against the flow."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("danlu.data.cache") < layer("danlu.model") < layer("danlu.app.cli")
    assert "danlu.app.common" in GRAPH["danlu.app.chat"]  # lazy imports inside functions are seen too
    assert "danlu.infer" in GRAPH["danlu.app.chat"]


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["bench", "--help"], ["data", "--help"]])
def test_the_cli_answers_help_without_importing_torch(argv):
    """`danlu --help` stays quick: no verb's parser pulls in torch or transformers."""
    code = (
        "import sys\nfrom danlu.app.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"
