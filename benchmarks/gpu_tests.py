"""The GPU test suite in one command: bundle here what the GPU machine lacks, run it there, record it.

Here (the CPU machine, after ``make install``)::

    make gpu-bundle     # .whl/: wheels the GPU machine lacks (tested versions), tokenizer, code id

On the GPU machine, in the repository root of a copy of this tree with ``.whl/`` beside it::

    python3 benchmarks/gpu_tests.py run

``run`` installs ``.whl/*.whl`` into a private folder (the machine's own torch, transformers and
peft stay), runs every ``gpu``-marked test (``tests/test_gpu.py``, ``tests/test_deepspeed.py``,
...) and appends a record (device, library versions, code, each test's outcome and seconds) to
the committed ``benchmarks/results/gpu_tests.json``, written to ``$OUT/gpu_tests.json`` when
``$OUT`` is set (the device tool brings that folder back; copy the file into
``benchmarks/results/``), else in place. Its exit code is pytest's. ``docs/development.md``
has the whole recipe.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / ".whl"
RECORD = ROOT / "benchmarks" / "results" / "gpu_tests.json"
CONSTRAINTS = ROOT / "src" / "danlu" / "constraints.txt"
# what the GPU machine's image lacks (it has torch, transformers, peft, accelerate, pytest, ...)
MISSING = ["bitsandbytes", "deepspeed", "gguf", "hjson", "pydantic", "pydantic-core", "annotated-types",
           "typing-inspection"]  # fmt: skip
# the serving and preference tests' own libraries: trl and datasets alone (the image has pyarrow,
# pandas, fsspec), the server's with what they need (minus what is bundled above)
MISSING += ["trl", "datasets", "dill", "multiprocess", "xxhash"]
WITH_DEPS = ["fastapi", "uvicorn", "openai"]
STACK = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed"]
DEVICE_PYTHON = "3.12"


def pinned(name: str) -> str:
    """``name==version`` from the tested stack (src/danlu/constraints.txt)."""
    for line in CONSTRAINTS.read_text().splitlines():
        if line.split("==")[0].strip().lower().replace("_", "-") == name:
            return line.strip()
    raise SystemExit(f"{name} is not pinned in {CONSTRAINTS}")


def bundle() -> int:
    """Wheels for the GPU machine's Python (its platform, not this one's), tokenizer files, code id."""
    BUNDLE.mkdir(exist_ok=True)
    for old in BUNDLE.glob("*.whl"):
        old.unlink()
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + [
        "--platform=manylinux2014_x86_64"
    ]
    download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                f"--python-version={DEVICE_PYTHON}", "--implementation=cp", *platforms, "-d", str(BUNDLE)]  # fmt: skip
    built = [pinned(n) for n in MISSING if n == "deepspeed"]  # an sdist: built here as a pure-Python wheel
    subprocess.run(download + [pinned(n) for n in MISSING if n != "deepspeed"], check=True)
    with tempfile.TemporaryDirectory() as extra:
        deps = [a for a in download[:-1] if a != "--no-deps"]  # the same, but into `extra`, with deps
        subprocess.run([*deps, extra, "-c", str(CONSTRAINTS), *(pinned(n) for n in WITH_DEPS)], check=True)
        have = {_project(p) for p in BUNDLE.glob("*.whl")}
        for wheel in Path(extra).glob("*.whl"):
            if _project(wheel) not in have:
                wheel.rename(BUNDLE / wheel.name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(BUNDLE), *built], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})  # fmt: skip
    from danlu.model import load_tokenizer, resolve

    load_tokenizer(resolve("smollm2-135m-instruct")).save_pretrained(BUNDLE / "smollm2-tokenizer")
    code = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    )
    (BUNDLE / "CODE").write_text(code.stdout.strip() or "unknown")
    size = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file()) / 2**20
    print(f"wrote {BUNDLE} ({size:.1f} MiB): carry it to the GPU machine with the tree")
    return 0


def _project(wheel: Path) -> str:
    """A wheel file's project name, normalised (``Pydantic_Core-2.1-...whl`` -> ``pydantic-core``)."""
    return wheel.name.split("-")[0].lower().replace("_", "-")


def outcomes(junit: Path) -> list[dict]:
    """Each test case of a JUnit XML report: name, outcome, seconds."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        outcome = {"failure": "failed"}.get(outcome, outcome)
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}",
                     "seconds": round(float(case.get("time", 0)), 3), "outcome": outcome})  # fmt: skip
    return rows


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(pytest_args: list[str]) -> int:
    site = Path(tempfile.gettempdir()) / "danlu-site"
    wheels = sorted(str(p) for p in BUNDLE.glob("*.whl"))
    if not wheels or not (BUNDLE / "smollm2-tokenizer").is_dir():
        print(
            "no .whl/ bundle here: run `make gpu-bundle` on the CPU machine and carry .whl", file=sys.stderr
        )
        return 2
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), *wheels], check=True)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")]),
           "DANLU_TEST_TOKENIZER_DIR": str(BUNDLE / "smollm2-tokenizer"), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    for switch in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        env.setdefault(switch, "0" if switch == "NCCL_NVLS_ENABLE" else "1")  # NVLink multicast stays off
    junit = Path(tempfile.gettempdir()) / "danlu-gpu-junit.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *(pytest_args or ["tests"])]  # fmt: skip
    started = datetime.datetime.now(datetime.timezone.utc)
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    sys.path.insert(0, str(site))  # the versions the tests ran with, bundled ones included
    import torch

    info = {n: version(n) for n in STACK}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    tests = outcomes(junit) if junit.is_file() else []
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    entry = {
        "code": (BUNDLE / "CODE").read_text().strip() if (BUNDLE / "CODE").is_file() else "unknown",
        "date": started.date().isoformat(),
        "device": device,
        "stack": info,
        "command": "python3 benchmarks/gpu_tests.py run " + " ".join(pytest_args),
        "pytest_exit_code": code,
        **counts,
        "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "tests": tests,
    }
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {"runs": []}
    record["runs"].append(entry)
    out = Path(os.environ["OUT"]) / RECORD.name if os.environ.get("OUT") else RECORD
    out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"gpu tests: {counts} in {entry['seconds']} s on {entry['device']}; recorded in {out}")
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="action", required=True)
    sub.add_parser("bundle", help="here: write .whl/ for the GPU machine")
    r = sub.add_parser("run", help="on the GPU machine: run the gpu tests and record them")
    r.add_argument("pytest_args", nargs="*", help="test paths or -k filters (default: tests)")
    args, extra = ap.parse_known_args(argv)
    return bundle() if args.action == "bundle" else run([*getattr(args, "pytest_args", []), *extra])


if __name__ == "__main__":
    sys.exit(main())
