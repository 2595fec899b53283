"""Named chat templates: each family's published format, written out, and what training trains.

The tokenizer is SmolLM2's with the family's special tokens added, so each token the template
writes is one token, as in the family's own vocabulary; nothing is downloaded.
"""

from __future__ import annotations

import copy

import pytest

from danlu.data.render import IGNORE, RecordError, render, render_samples
from danlu.data.templates import TEMPLATES, apply_template
from danlu.errors import UserError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name?"},
    {"role": "assistant", "content": "Danlu."},
]

CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nName?<|im_end|>\n"
    "<|im_start|>assistant\nDanlu.<|im_end|>\n"
)

# name: (the family's special tokens, CHAT rendered, the trained runs of tokens)
FAMILIES = {
    "llama2": (
        {"bos_token": "<s>", "eos_token": "</s>"},
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Name? [/INST] Danlu. </s>",
        [" Hello. </s>", " Danlu. </s>"],
    ),
    "mistral": (
        {"bos_token": "<s>", "eos_token": "</s>"},
        "<s>[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] Name? [/INST]Danlu.</s>",
        ["Hello.</s>", "Danlu.</s>"],
    ),
    "llama3": (
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        },
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nDanlu.<|eot_id|>",
        ["Hello.<|eot_id|>", "Danlu.<|eot_id|>"],
    ),
    "gemma": (
        {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        },
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nName?<end_of_turn>\n<start_of_turn>model\nDanlu.<end_of_turn>\n",
        ["Hello.<end_of_turn>\n", "Danlu.<end_of_turn>\n"],
    ),
    "phi3": (
        {
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        },
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
        "<|user|>\nName?<|end|>\n<|assistant|>\nDanlu.<|end|>\n",
        ["Hello.<|end|>\n", "Danlu.<|end|>\n"],
    ),
    "internlm2": (
        {"bos_token": "<s>", "eos_token": "</s>"},
        "<s>" + CHATML,
        ["Hello.<|im_end|>\n", "Danlu.<|im_end|>\n"],
    ),
    "qwen": (
        {"eos_token": "<|endoftext|>"},
        CHATML,
        ["Hello.<|im_end|>\n", "Danlu.<|im_end|>\n"],
    ),
    "glm4": (
        {
            "eos_token": "<|endoftext|>",
            "additional_special_tokens": ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"],
        },
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello.<|user|>\nName?<|assistant|>\n"
        "Danlu.<|user|>",
        ["\nHello.<|user|>", "\nDanlu.<|user|>"],
    ),
}
QWEN3_TOKENS = {"eos_token": "<|endoftext|>", "additional_special_tokens": ["<think>", "</think>"]}


def family(tokenizer, name: str, tokens: dict):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens(tokens)
    apply_template(tok, name)
    return tok


def trained_runs(tokenizer, sample) -> list[str]:
    """Each run of consecutive trained tokens, decoded."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(int(token))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("name", FAMILIES)
def test_family_template_renders_its_format_and_trains_replies_with_their_stop(tokenizer, name):
    tokens, text, runs = FAMILIES[name]
    tok = family(tokenizer, name, tokens)
    assert tok.apply_chat_template(CHAT, tokenize=False) == text
    sample = render(tok, CHAT, 512, {tok.eos_token_id})
    assert tok.decode(sample.input_ids) == text
    assert trained_runs(tok, sample) == runs
    stop = TEMPLATES[name].stop or tok.eos_token
    assert tok.eos_token == stop and all(run.rstrip("\n").endswith(stop) for run in runs)


def test_generation_prompts_end_where_the_reply_starts(tokenizer):
    expected = {
        "llama2": "[INST] Name? [/INST]",
        "mistral": "[INST] Name? [/INST]",
        "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "gemma": "<start_of_turn>model\n",
        "phi3": "<|assistant|>\n",
        "internlm2": "<|im_start|>assistant\n",
        "qwen": "<|im_start|>assistant\n",
        "glm4": "Name?<|assistant|>",
    }
    for name, end in expected.items():
        tok = family(tokenizer, name, FAMILIES[name][0])
        prompt = tok.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith(end), name
        assert FAMILIES[name][1].startswith(prompt), name  # the reply follows the prompt as written


def test_glm4_ends_a_reply_with_the_next_role_token(tokenizer):
    """GLM closes no turn: the next role token ends it and generation stops on <|user|>. The
    template closes a conversation's last reply with <|user|>, so that token is trained."""
    tok = family(tokenizer, "glm4", FAMILIES["glm4"][0])
    assert tok.eos_token == "<|user|>"
    one = tok.apply_chat_template(CHAT[:3], tokenize=False)
    assert one == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello.<|user|>"
    assert FAMILIES["glm4"][1].startswith(one)  # the same token that opens the next user turn


def test_gemma_folds_the_system_prompt_and_refuses_roles_out_of_turn(tokenizer):
    tok = family(tokenizer, "gemma", FAMILIES["gemma"][0])
    assert "system" not in tok.apply_chat_template(CHAT, tokenize=False)
    with pytest.raises(RecordError, match="gemma template needs user and assistant turns in turn"):
        render(tok, [CHAT[1], CHAT[1], CHAT[2]], 512, {tok.eos_token_id})


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_refuse_what_they_have_no_format_for(tokenizer, name):
    tok = family(tokenizer, name, {**FAMILIES, "qwen3": (QWEN3_TOKENS,)}.get(name, ({},))[0])
    stop = {tok.eos_token_id}
    tools = [{"type": "function", "function": {"name": "now", "parameters": {}}}]
    with pytest.raises(RecordError, match=f"the {name} template has no format for tools"):
        render(tok, CHAT, 512, stop, tools=tools)
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "now", "arguments": {}}}],
    }
    with pytest.raises(RecordError, match=f"the {name} template has no format for tool calls"):
        render(tok, [CHAT[1], call, {"role": "tool", "content": "noon"}, CHAT[2]], 512, stop)
    if name not in ("chatml", "qwen", "internlm2", "llama3", "gemma"):  # any role / own check
        with pytest.raises(
            RecordError, match=f"the {name} template takes system, user and assistant messages, not tool"
        ):
            render(tok, [CHAT[1], {"role": "tool", "content": "noon"}, CHAT[2]], 512, stop)


def test_qwen_adds_its_default_system_prompt(tokenizer):
    tok = family(tokenizer, "qwen", FAMILIES["qwen"][0])
    assert tok.apply_chat_template(CHAT[1:3], tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_a_template_for_another_vocabulary_is_refused(tokenizer):
    with pytest.raises(UserError, match="ends turns with <end_of_turn>"):
        apply_template(copy.deepcopy(tokenizer), "gemma")
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    with pytest.raises(UserError, match=r"writes \[gMASK\], <sop>, <\|system\|>, <\|assistant\|>"):
        apply_template(tok, "glm4")
    assert tok.chat_template == tokenizer.chat_template  # nothing was changed


# ---------------------------------------------------------------------------- qwen3

THOUGHTFUL = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4."},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6.", "reasoning_content": "Three and three."},
]


def test_qwen3_keeps_only_the_reasoning_after_the_last_user_message(tokenizer):
    tok = family(tokenizer, "qwen3", QWEN3_TOKENS)
    assert tok.apply_chat_template(THOUGHTFUL, tokenize=False) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\n3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThree and three.\n</think>\n\n6.<|im_end|>\n"
    )
    # the last reply always carries a <think> block, empty without reasoning
    assert tok.apply_chat_template(CHAT[:3], tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello.<|im_end|>\n"
    )


def test_qwen3_enable_thinking_false_closes_the_think_block_in_the_prompt(tokenizer):
    tok = family(tokenizer, "qwen3", QWEN3_TOKENS)
    on = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n")
    assert off == on + "<think>\n\n</think>\n\n"


def test_qwen3_trains_each_reply_as_it_was_written(tokenizer):
    """Each reply is trained after the prompt the model had when it wrote it, with its own
    reasoning; the first reply, whose reasoning the whole chat drops, is a sample of its own."""
    tok = family(tokenizer, "qwen3", QWEN3_TOKENS)
    whole, first = render_samples(tok, THOUGHTFUL, 512, {tok.eos_token_id})
    assert tok.decode(whole.input_ids) == tok.apply_chat_template(THOUGHTFUL, tokenize=False)
    assert trained_runs(tok, whole) == ["<think>\nThree and three.\n</think>\n\n6.<|im_end|>\n"]
    assert tok.decode(first.input_ids) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nTwo and two.\n</think>\n\n4.<|im_end|>\n"
    )
    assert trained_runs(tok, first) == ["<think>\nTwo and two.\n</think>\n\n4.<|im_end|>\n"]
    for sample, before in ((first, THOUGHTFUL[:1]), (whole, THOUGHTFUL[:3])):  # what the model saw
        start = next(k for k, label in enumerate(sample.labels) if label != IGNORE)
        assert tok.decode(sample.input_ids[:start]) == tok.apply_chat_template(
            before, tokenize=False, add_generation_prompt=True
        )


def test_qwen3_single_turn_and_the_other_loss_modes_stay_one_sample(tokenizer):
    tok = family(tokenizer, "qwen3", QWEN3_TOKENS)
    stop = {tok.eos_token_id}
    assert len(render_samples(tok, THOUGHTFUL[:2], 512, stop)) == 1
    (last,) = render_samples(tok, THOUGHTFUL, 512, stop, "last_assistant")
    assert trained_runs(tok, last) == ["<think>\nThree and three.\n</think>\n\n6.<|im_end|>\n"]
    (everything,) = render_samples(tok, THOUGHTFUL, 512, stop, "all")
    assert list(everything.labels) == list(everything.input_ids)
    assert tok.decode(everything.input_ids) == tok.apply_chat_template(THOUGHTFUL, tokenize=False)
