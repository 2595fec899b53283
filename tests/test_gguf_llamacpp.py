"""danlu export gguf, run by llama.cpp itself (llama-cpp-python, built by `make install`).

Every family's tiny random model computes in llama.cpp the logits transformers computes for a chat
prompt (f32 to float rounding, f16 within a bound measured here); each type (f16, bf16, q8_0 and
the k-quants) stays within its measured bound; and (slow) the embedded SmolLM2 in each type, with
a real answer through the file's own chat template. Builders: tests/gguf_helpers.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from danlu.export import export_gguf
from gguf_helpers import (
    BOUND,
    FAMILIES,
    GELU_F32,
    build,
    byte_level_tokenizer,
    chat_ids,
    gguf_types,
    hf_logits,
    lcpp_logits,
    load,
    rel_error,
)

pytest_plugins = ["gguf_helpers"]  # its fixtures: family_dirs, real_tokenizer


# ----------------------------------------------------------------------- architectures


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_runs_in_llama_cpp_like_transformers(family, family_dirs, tokenizer, tmp_path):
    src = family_dirs(family)
    ids = chat_ids(tokenizer)
    ref = hf_logits(src, ids)
    for qtype in ("f32", "f16"):
        path = export_gguf(src, tmp_path / f"{qtype}.gguf", qtype=qtype).path
        got = lcpp_logits(load(path), ids)
        want = ref if qtype == "f32" else hf_logits(src, ids, round_to=torch.float16)
        err = rel_error(got, want)
        print(
            f"{family} {qtype}: relative logit error {err:.2e} (max |Δ| {np.abs(got - want).max():.2e}, "
            f"max |logit| {np.abs(want).max():.1f})"
        )
        gelu = family.startswith(("gemma", "bloom", "falcon")) and qtype == "f32"
        assert err < (GELU_F32 if gelu else BOUND[qtype])
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_bloom_alibi_with_a_head_count_not_a_power_of_two(tokenizer, tmp_path):
    """With 6 heads ALiBi's slopes come from two series (4 heads' slopes, then 2 between them):
    llama.cpp computes them from the head count as transformers does (measured 3.2e-4, GELU)."""
    src = build(
        tmp_path / "src", tokenizer, **{**FAMILIES["bloom"], "num_attention_heads": 6, "hidden_size": 96}
    )
    ids = chat_ids(tokenizer)
    got = lcpp_logits(load(export_gguf(src, tmp_path / "m.gguf", qtype="f32").path), ids)
    assert rel_error(got, hf_logits(src, ids)) < GELU_F32


# ------------------------------------------------------------------------------ types

# Relative logit error against transformers (fp32, original weights) of 256-wide 2-layer random
# models (k-quant blocks are 256 wide) on a 60-token text; measured maxima over the 8 families:
# f16 0.0011, bf16 0.0090, q8_0 0.029, q6_k 0.076, q5_k_m 0.156, q4_k_m 0.287 (random weights
# quantize worse than trained ones: see the slow test on SmolLM2 below). A wrong file scores ~1.
TYPE_BOUND = {"f16": 0.002, "bf16": 0.015, "q8_0": 0.045, "q6_k": 0.11, "q5_k_m": 0.22, "q4_k_m": 0.40}
# what llama.cpp's type mix must contain (k-quants keep some tensors in Q6_K or Q5_K)
TYPE_TENSORS = {
    "f16": "F16",
    "bf16": "BF16",
    "q8_0": "Q8_0",
    "q6_k": "Q6_K",
    "q5_k_m": "Q5_K",
    "q4_k_m": "Q4_K",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_in_each_type_runs_in_llama_cpp_within_its_bound(family, tmp_path):
    tokenizer = byte_level_tokenizer()
    kwargs = {**FAMILIES[family], "hidden_size": 256, "intermediate_size": 512, "initializer_range": 0.05}
    kwargs.update({k: 64 for k in ("head_dim", "query_pre_attn_scalar") if k in kwargs})
    src = build(tmp_path / "src", tokenizer, vocab_size=288, **kwargs)  # padded past the tokenizer
    ids = tokenizer("丹炉 fine-tunes a chat model; def f(x): return x ** 2 🙂")["input_ids"]
    ref = hf_logits(src, ids)
    errors = {}
    for qtype, bound in TYPE_BOUND.items():
        path = export_gguf(src, tmp_path / f"{qtype}.gguf", qtype=qtype).path
        types = gguf_types(path)
        assert TYPE_TENSORS[qtype] in types, (qtype, types)
        errors[qtype] = rel_error(lcpp_logits(load(path, n_ctx=128), ids), ref)
        assert errors[qtype] < bound, (family, qtype, errors[qtype])
    print(family, {k: round(v, 4) for k, v in errors.items()})
    assert errors["f16"] < errors["q8_0"] < errors["q4_k_m"]


# ------------------------------------------------------------- the real model (slow)

# Relative logit error of the embedded SmolLM2-135M-Instruct (30 layers, 576 wide: rows that are
# not a multiple of 256 fall back from k-quant blocks) on the chat prompt, against transformers
# in fp32; measured (top-1 agreement over the prompt): f16 0.0011 (1.00), bf16 0.0094 (0.98),
# q8_0 0.028 (0.94), q6_k 0.053 (0.92), q5_k_m 0.156 (0.85), q4_k_m 0.122 (0.89). danlu's q8_0 is
# bit-identical to llama.cpp's own. Greedy answers of the quantized files drift on this small
# model (llama.cpp also quantizes activations in quantized matmuls): the package's own Q4_1 GGUF
# answers "What is the capital of France?" with "L'Étoile, la Marseillaise, ..." in llama.cpp too.
REAL_BOUND = {"f16": 0.003, "bf16": 0.02, "q8_0": 0.05, "q6_k": 0.1, "q5_k_m": 0.25, "q4_k_m": 0.4}


@pytest.mark.slow
def test_the_embedded_model_in_each_type_in_llama_cpp(default_model_dir, tokenizer, tmp_path):
    ids = chat_ids(tokenizer)
    ref = hf_logits(default_model_dir, ids)
    for qtype, bound in REAL_BOUND.items():
        path = export_gguf(default_model_dir, tmp_path / f"{qtype}.gguf", qtype=qtype).path
        llm = load(path)
        got = lcpp_logits(llm, ids)
        err, top1 = rel_error(got, ref), float((got.argmax(-1) == ref.argmax(-1)).mean())
        size = path.stat().st_size / 2**20
        print(
            f"SmolLM2-135M {qtype}: {size:.0f} MiB, relative logit error {err:.4f}, top-1 agreement {top1:.2f}"
        )
        assert err < bound and top1 >= 0.8, (qtype, err, top1)
        if qtype == "f16":  # a real answer, through the file's own chat template, that ends
            chat = [{"role": "user", "content": "What is the capital of France?"}]
            out = llm.create_chat_completion(chat, max_tokens=60, temperature=0.0)["choices"][0]
            assert "Paris" in out["message"]["content"] and out["finish_reason"] == "stop", out
        path.unlink()
