"""danlu merge and danlu export gguf: parity with the source, files written, failures leave nothing."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl
from danlu.app.cli import main
from danlu.errors import UserError
from danlu.export import export_gguf, merge
from danlu.export.merge import PARITY_CHATS

CHAT = [
    {"role": "system", "content": "You are Danlu (丹炉), a helpful assistant."},
    {"role": "user", "content": "你好！Please explain LoRA in one sentence, 用中文和英文。"},
]


def chat_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    return torch.tensor([list(ids)])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits[0].float()


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter trained for a few steps by danlu's own train(): OUTPUT/final + run config."""
    from danlu.config import load_config
    from danlu.train import train

    tmp = tmp_path_factory.mktemp("adapter-run")
    records = [{"instruction": f"Who are you {i}?", "input": "", "output": "I am Danlu."} for i in range(4)]
    data = write_jsonl(tmp / "train.jsonl", records)
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.path={data}",
            f"output.dir={tmp / 'run'}",
            "output.tensorboard=false",
            "lora.r=4",
            "lora.alpha=8",
            "lora.dropout=0",
            "train.max_steps=3",
            "train.lr=5e-2",
            "train.batch_size=4",
        ],
    )
    return train(cfg, progress=False).adapter_dir


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}-")]


def test_merged_folder_loads_with_plain_transformers_and_matches_base_plus_adapter(
    tiny_model_dir, adapter, tmp_path, capsys
):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0
    assert "parity: max |merged - (base + adapter)|" in capsys.readouterr().out

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = chat_ids(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = logits(base, ids)
    tuned = logits(PeftModel.from_pretrained(base, adapter), ids)
    assert (tuned - plain).abs().max() > 1e-3  # the adapter does something, so the check below can fail
    assert (logits(merged, ids) - tuned).abs().max() < 5e-5 * tuned.abs().max()
    assert merged.dtype == torch.float32  # the base's dtype by default
    assert not any(n for n, _ in merged.named_parameters() if "lora" in n)

    # the tokenizer with the run's chat template, stop tokens, and a model card with the run config
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(adapter).chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## Training config" in card and "lr: 0.05" in card
    assert "## Data summary" in card
    assert leftovers(tmp_path, "merged") == []


def test_tiny_max_shard_size_writes_several_shards_with_an_index(tiny_model_dir, adapter, tmp_path):
    result = merge(adapter, str(tiny_model_dir), tmp_path / "m", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    # loaded back from the shards, it answers as base + adapter (and the shards hold every tensor)
    ids = chat_ids(AutoTokenizer.from_pretrained(adapter))
    tuned = logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter), ids
    )
    sharded = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), ids)
    assert (sharded - tuned).abs().max() < 5e-5 * tuned.abs().max()
    assert result.max_diff < 5e-5 * tuned.abs().max()  # what merge() measured agrees


def test_bf16_merge_passes_its_tolerance_and_writes_bf16(tiny_model_dir, adapter, tmp_path):
    result = merge(adapter, str(tiny_model_dir), tmp_path / "b", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    # the bf16 merge answers as the fp32 base + adapter does, up to bf16 rounding, and carries the adapter
    ids = chat_ids(AutoTokenizer.from_pretrained(adapter))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = logits(base, ids)
    tuned = logits(PeftModel.from_pretrained(base, adapter), ids)
    ours = logits(merged, ids)
    # bf16 rounding through this tiny, large-weighted model: 8% of the adapter's effect (measured);
    # without the adapter merged in it would be 100%
    assert (ours - tuned).norm() < 0.15 * (tuned - plain).norm()
    assert 0 < result.max_diff <= result.tolerance < (tuned - plain).abs().max()


def test_non_empty_out_is_refused_without_overwrite_and_left_alone(adapter, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite still never replaces a folder that is not a model folder
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert leftovers(tmp_path, "taken") == []


def test_a_bad_shard_size_is_refused_before_loading(adapter, tmp_path):
    with pytest.raises(UserError, match="--max-shard-size lots"):
        merge(adapter, "no/such-model", tmp_path / "x", max_shard_size="lots")
    assert not (tmp_path / "x").exists()


def test_overwrite_replaces_a_previous_merge(adapter, tmp_path):
    out = tmp_path / "again"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0
    (out / "stale.txt").write_text("old")
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()


def test_broken_parity_fails_and_writes_nothing(adapter, tmp_path, monkeypatch, capsys):
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner.merge_and_unload

    def corrupt(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.01)  # a 1% error in one tensor
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", corrupt)
    out = tmp_path / "broken"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "parity check failed" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path, "broken") == []


def test_parity_prompts_go_through_the_chat_template(tokenizer):
    from danlu.export.merge import render_prompts

    prompts, used = render_prompts(tokenizer)
    assert len(prompts) == len(PARITY_CHATS) == 3
    assert all(p[-3:] == tokenizer("<|im_start|>assistant\n")["input_ids"][-3:] for p in prompts)
    assert used == "3 chats through the chat template"


# ChatML that refuses a system turn, and Mistral v0.1's template (roles must alternate, from a user)
NO_SYSTEM = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def with_template(default_model_dir, template: str):
    """A fresh copy of the SmolLM2 tokenizer with another chat template (the session one stays)."""
    from danlu.model import load_tokenizer

    tok = load_tokenizer(str(default_model_dir))
    tok.chat_template = template
    return tok


@pytest.mark.parametrize(
    ("template", "error"),
    [(NO_SYSTEM, "System role not supported"), (MISTRAL, "Conversation roles must alternate")],
)
def test_parity_prompts_drop_the_system_turn_a_template_rejects(default_model_dir, template, error):
    from danlu.export.merge import render_prompts

    tok = with_template(default_model_dir, template)
    with pytest.raises(Exception, match=error):  # the template really rejects the built-in chat
        tok.apply_chat_template(PARITY_CHATS[1], tokenize=False)
    prompts, used = render_prompts(tok)
    assert used.startswith("3 chats through the chat template (system turn dropped from 1: ")
    assert error in used
    no_system = [m for m in PARITY_CHATS[1] if m["role"] != "system"]
    kw = {"add_generation_prompt": True, "tokenize": True, "return_dict": False}
    assert prompts[1] == list(tok.apply_chat_template(no_system, **kw))
    assert prompts[0] == list(tok.apply_chat_template(PARITY_CHATS[0], **kw))
    assert len(set(map(tuple, prompts))) == 3


def test_parity_prompts_fall_back_to_plain_text_when_the_template_renders_nothing(default_model_dir):
    from danlu.export.merge import render_prompts

    tok = with_template(default_model_dir, "{{ raise_exception('this template renders nothing') }}")
    prompts, used = render_prompts(tok)
    assert used == "3 chats as plain text (the chat template rendered none: this template renders nothing)"
    assert prompts == [tok(" ".join(m["content"] for m in c))["input_ids"] for c in PARITY_CHATS]


@pytest.fixture(scope="module")
def strict_adapter(default_model_dir, tmp_path_factory):
    """An adapter trained by danlu over a tiny model whose chat template raises on a system turn."""
    from conftest import build_tiny_llama
    from danlu.config import load_config
    from danlu.train import train

    tmp = tmp_path_factory.mktemp("strict-run")
    model_dir = build_tiny_llama(tmp / "model", with_template(default_model_dir, NO_SYSTEM))
    records = [{"instruction": f"Who are you {i}?", "input": "", "output": "I am Danlu."} for i in range(4)]
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.path={write_jsonl(tmp / 'train.jsonl', records)}",
            "data.cache=false",
            f"output.dir={tmp / 'run'}",
            "output.tensorboard=false",
            "lora.r=4",
            "lora.alpha=8",
            "lora.dropout=0",
            "train.max_steps=3",
            "train.lr=5e-2",
            "train.batch_size=4",
        ],
    )
    return model_dir, train(cfg, progress=False).adapter_dir


def test_merge_with_a_template_that_rejects_system_turns_still_checks_parity(
    strict_adapter, tmp_path, monkeypatch, capsys
):
    model_dir, adapter = strict_adapter
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "on 3 chats through the chat template (system turn dropped from 1: System role not supported)"
        in printed
    )
    assert "System role not supported" in (out / "README.md").read_text(encoding="utf-8")

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == NO_SYSTEM  # the run's template, carried along
    ids = torch.tensor([list(range(5, 40))])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    plain = logits(base, ids)
    tuned = logits(PeftModel.from_pretrained(base, adapter), ids)
    assert (tuned - plain).abs().max() > 1e-3
    assert (
        logits(AutoModelForCausalLM.from_pretrained(out), ids) - tuned
    ).abs().max() < 5e-5 * tuned.abs().max()

    # the check on those prompts is real: a 1% error in one tensor fails it, and nothing is written
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner.merge_and_unload

    def corrupt(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.01)
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", corrupt)
    broken = tmp_path / "broken"
    assert main(["merge", "--adapter", str(adapter), "--out", str(broken)]) == 2
    captured = capsys.readouterr()
    assert "parity check failed" in captured.err and "system turn dropped from 1" in captured.out
    assert not broken.exists() and leftovers(tmp_path, "broken") == []


# ------------------------------------------------------------------------------------- GGUF


def roundtrip(model_dir, tmp_path, qtype: str):
    path = export_gguf(model_dir, tmp_path / f"m-{qtype}.gguf", qtype=qtype).path
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    return path, model


def test_gguf_round_trip_of_a_tiny_llama_with_grouped_query_attention(tiny_model_dir, tokenizer, tmp_path):
    # 4 query heads over 2 kv heads: a wrong q/k permutation or head count breaks the logits
    ids = chat_ids(tokenizer)
    expected = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids)
    _, model = roundtrip(tiny_model_dir, tmp_path, "f16")
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff < 3e-2 * expected.abs().max().item()  # measured ~0.8%: f16 weights in a chaotic tiny net
    assert (logits(model, ids).argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_gguf_round_trip_of_a_tiny_qwen2_with_biases(tokenizer, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.5,
    )
    src = tmp_path / "qwen2"
    Qwen2ForCausalLM(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    ids = chat_ids(tokenizer)
    expected = logits(AutoModelForCausalLM.from_pretrained(src), ids)
    _, model = roundtrip(src, tmp_path, "f16")
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.config.tie_word_embeddings
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff < 3e-2 * expected.abs().max().item()  # measured ~0.8%: f16 weights in a chaotic tiny net
    assert (logits(model, ids).argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_gguf_refuses_architectures_it_cannot_write(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    out = tmp_path / "x.gguf"
    assert main(["export", "gguf", "--model", str(tmp_path / "gpt2"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_gguf_refuses_an_existing_file_without_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(UserError, match="--overwrite"):
        export_gguf(tiny_model_dir, out)
    assert out.read_bytes() == b"keep"


# measured on the embedded SmolLM2-135M (logit scale ~38): f16 0.041, q8_0 1.06-1.10; argmax equal everywhere
GGUF_TOLERANCE = {"f16": 0.15, "q8_0": 2.5}


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_gguf_round_trip_of_the_default_model(default_model_dir, tokenizer, tmp_path, qtype):
    ids = chat_ids(tokenizer)
    original = logits(AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32), ids)
    path, model = roundtrip(default_model_dir, tmp_path, qtype)
    got = logits(model, ids)
    diff = (got - original).abs().max().item()
    print(f"{qtype}: max |gguf - original| logit difference {diff:.4f}")
    assert diff < GGUF_TOLERANCE[qtype]
    assert (got.argmax(-1) == original.argmax(-1)).float().mean() >= 0.9
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert loaded.chat_template == tokenizer.chat_template
    assert chat_ids(loaded).tolist() == ids.tolist()
    text = "丹炉 fine-tunes LLMs：训练、合并、导出 GGUF. 123 + 456 = 579!"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
