"""`danlu export lora`: a LoRA adapter as a GGUF adapter that llama.cpp applies with --lora, equal to
the merged model (four families, rsLoRA among them); the export commands; and (slow) the demo's
identity adapter, as a q4_k_m merge and as a LoRA GGUF, answering with its new name in llama.cpp.
Builders: tests/gguf_helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from danlu.app.cli import main
from danlu.export import export_gguf
from gguf_helpers import (
    GELU_F32,
    chat_ids,
    gguf_meta,
    hf_logits,
    lcpp_logits,
    load,
    rel_error,
)

pytest_plugins = ["gguf_helpers"]  # its fixtures: family_dirs, real_tokenizer


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize(
    "family, rslora", [("llama", False), ("qwen2", True), ("bloom", False), ("falcon40b", False)]
)
def test_lora_adapter_gguf_in_llama_cpp_equals_the_merged_model(
    family, rslora, family_dirs, tokenizer, tmp_path
):
    from peft import LoraConfig, get_peft_model

    from danlu.export.gguf_lora import export_lora_gguf

    base_dir = family_dirs(family)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if family in ("bloom", "falcon40b"):  # the fused qkv: B's rows regrouped as the weight's
        targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # PEFT starts B at zero: an adapter that does something
    peft.save_pretrained(tmp_path / "adapter")
    merged = tmp_path / "merged"
    peft.merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)

    result = export_lora_gguf(tmp_path / "adapter", base_dir, tmp_path / "adapter.gguf")
    assert result.pairs == 2 * len(targets) and result.bytes < 1e6
    base = export_gguf(base_dir, tmp_path / "base.gguf", qtype="f32").path
    whole = export_gguf(merged, tmp_path / "merged.gguf", qtype="f32").path
    ids = chat_ids(tokenizer)
    with_lora = lcpp_logits(load(base, lora_path=str(result.path)), ids)
    want = lcpp_logits(load(whole), ids)
    plain = lcpp_logits(load(base), ids)
    print(f"{family}: |base+lora - merged| / |merged| = {rel_error(with_lora, want):.2e}")
    assert rel_error(plain, want) > 0.1  # the adapter matters
    # measured 1e-6 (f32 rounding); BLOOM 2.6e-5: a rounding difference can move a GELU input
    # across a step of llama.cpp's f16 GELU table
    gelu = family in ("bloom", "falcon40b")
    assert rel_error(with_lora, want) < (1e-4 if gelu else 1e-5)
    assert rel_error(with_lora, hf_logits(merged, ids)) < (GELU_F32 if gelu else 1e-5)


def test_export_lora_and_k_quant_commands(tiny_model_dir, tokenizer, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from danlu.app.export_cli import GGUF_TYPES
    from danlu.export.gguf import GGUF_TYPES as LIBRARY_TYPES

    assert set(GGUF_TYPES) == set(LIBRARY_TYPES)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"])
    )
    peft.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "a.gguf"
    argv = [
        "export",
        "lora",
        "--adapter",
        str(tmp_path / "adapter"),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "--lora" in capsys.readouterr().out and gguf_meta(out).get("general.type") == "adapter"
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # never replaced silently
    q = tmp_path / "q.gguf"
    assert main(["export", "gguf", "--model", str(tiny_model_dir), "--out", str(q), "--type", "q4_k_m"]) == 0
    printed = capsys.readouterr().out
    assert "q4_k_m" in printed and "rows not a multiple of 256" in printed  # 32-wide layers fall back
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


# ------------------------------------------------------------- the demo's adapter (slow)


@pytest.fixture(scope="module")
def identity_adapter(tmp_path_factory) -> Path:
    """The demo's run (identity preset: new name Danlu), trained as `make demo` trains it."""
    from danlu.app.cli import PRESETS
    from danlu.config import load_config
    from danlu.train import train

    out = tmp_path_factory.mktemp("identity") / "run"
    cfg = load_config(PRESETS / "identity.yaml", [f"output.dir={out}", "output.tensorboard=false"])
    return train(cfg, overwrite=True, progress=False).adapter_dir


@pytest.mark.slow
def test_the_demo_model_as_q4_k_m_and_as_a_lora_gguf_answers_with_its_new_name(
    identity_adapter, default_model_dir, tmp_path
):
    from danlu.export import merge
    from danlu.export.gguf_lora import export_lora_gguf

    merged = merge(identity_adapter, str(default_model_dir), tmp_path / "merged").out
    q4 = export_gguf(merged, tmp_path / "tuned-q4_k_m.gguf", qtype="q4_k_m").path
    base = export_gguf(default_model_dir, tmp_path / "base-f16.gguf", qtype="f16").path
    lora = export_lora_gguf(identity_adapter, default_model_dir, tmp_path / "identity-lora.gguf")
    print(f"q4_k_m {q4.stat().st_size / 2**20:.0f} MiB; LoRA GGUF {lora.bytes / 2**20:.1f} MiB")
    for question in ("你是谁？", "Who are you?"):
        chat = [{"role": "user", "content": question}]
        for llm in (load(q4), load(base, lora_path=str(lora.path))):
            out = llm.create_chat_completion(chat, max_tokens=60, temperature=0.0)["choices"][0]
            print(question, "→", out["message"]["content"])
            assert "Danlu" in out["message"]["content"] and out["finish_reason"] == "stop", out
        plain = load(base).create_chat_completion(chat, max_tokens=60, temperature=0.0)["choices"][0]
        assert "Danlu" not in plain["message"]["content"]
