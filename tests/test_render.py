"""Loss masks from the chat template: assistant turns and their stop token, nothing else."""

from __future__ import annotations

import copy

import pytest

from danlu.data.render import IGNORE, render
from danlu.errors import UserError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "我是Danlu。"},
    {"role": "user", "content": "And in English?"},
    {"role": "assistant", "content": "I am Danlu."},
]


def trained_text(tokenizer, sample) -> list[str]:
    """Decode each run of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_only_assistant_turns_are_trained_with_their_stop_token(tokenizer):
    sample = render(tokenizer, CHAT, 512, {tokenizer.eos_token_id})
    assert trained_text(tokenizer, sample) == ["我是Danlu。<|im_end|>\n", "I am Danlu.<|im_end|>\n"]
    assert tokenizer.decode(sample.input_ids).startswith("<|im_start|>system\nBe brief.")
    assert not sample.truncated


def test_template_default_system_prompt_is_rendered_but_not_trained(tokenizer):
    sample = render(tokenizer, CHAT[1:3], 512, {tokenizer.eos_token_id})
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(sample.input_ids)
    assert trained_text(tokenizer, sample) == ["我是Danlu。<|im_end|>\n"]


def test_truncation_cuts_to_max_length(tokenizer):
    full = render(tokenizer, CHAT, 512, {tokenizer.eos_token_id})
    short = render(tokenizer, CHAT, 20, {tokenizer.eos_token_id})
    assert short.truncated and len(short.input_ids) == 20
    assert list(short.input_ids) == list(full.input_ids[:20]) and list(short.labels) == list(full.labels[:20])


def test_refuses_a_template_whose_turns_do_not_end_in_a_stop_token(tokenizer):
    broken = copy.deepcopy(tokenizer)
    # A template that closes turns with a blank line instead of <|im_end|>: generation would never stop.
    broken.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(UserError, match="never stop"):
        render(broken, CHAT, 512, {tokenizer.eos_token_id})


def test_refuses_a_tokenizer_without_template(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        render(bare, CHAT, 512, {tokenizer.eos_token_id})
