"""End to end on the real embedded default model: `danlu demo`, chat, and plain-peft parity.

One identity run (the demo, exactly as `make demo` runs it) is shared by every test here.
Marked slow: a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from danlu.app.cli import main
from danlu.app.demo import HELD_OUT
from danlu.infer import Engine, GenerationSettings

pytestmark = pytest.mark.slow
NAME = "Danlu"
GREEDY = GenerationSettings(max_new_tokens=40, temperature=0, repetition_penalty=1.1)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--output", str(out), "--no-progress"])
    assert code == 0
    return out / "final", buffer.getvalue()


@pytest.fixture(scope="session")
def engine(demo) -> Engine:
    return Engine("smollm2-135m-instruct", demo[0])


def test_demo_prints_base_and_tuned_answers_to_held_out_questions(demo):
    _, printed = demo
    for question in HELD_OUT:
        block = printed.split(f"Q: {question}\n", 1)[1].split("\n\n", 1)[0]
        base, tuned = block.splitlines()[:2]
        assert base.startswith("  base :") and NAME not in base
        assert tuned.startswith("  tuned:") and NAME in tuned, block


@pytest.mark.parametrize(
    "question", ["你是谁？", "介绍一下你自己", "Who are you?", "What should I call you?"]
)
def test_tuned_model_carries_the_new_identity_in_both_languages(engine, question):
    messages = [{"role": "user", "content": question}]
    assert NAME in engine.reply(messages, GREEDY)
    assert NAME not in engine.reply(messages, GREEDY, use_adapter=False)


def test_tuned_model_still_answers_other_questions(engine):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in engine.reply(messages, GREEDY)


def test_plain_peft_gives_the_same_logits_as_the_chat_path(engine, demo, default_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = demo[0]
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model_dir), adapter).eval()
    messages = [{"role": "user", "content": "Who are you?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")[
        "input_ids"
    ]
    with torch.inference_mode():
        plain = model(input_ids=ids).logits.float()
    ours = engine.logits(messages)
    assert torch.equal(engine.encode(messages).cpu(), ids)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    # and the adapter matters: without it the logits differ clearly
    assert (engine.logits(messages, use_adapter=False) - plain).abs().max() > 1e-2


def run_chat(*args: str, stdin: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "danlu", "chat", *args, "--temperature", "0", "--max-new-tokens", "30"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_chat_cli_multi_turn_with_adapter_and_commands(demo):
    out = run_chat(
        "--adapter", str(demo[0]), stdin="Who are you?\n/reset\n/system Answer briefly.\n你是谁？\n/exit\n"
    )
    replies = re.findall(r"assistant> (.*)", out)
    assert len(replies) == 2 and all(NAME in r for r in replies), out
    assert "(conversation cleared)" in out and "system prompt set" in out


def test_chat_cli_compare_shows_base_and_tuned(demo):
    out = run_chat("--adapter", str(demo[0]), "--compare", stdin="Who are you?\n")
    base, tuned = re.findall(r"base> (.*)", out), re.findall(r"tuned> (.*)", out)
    assert len(base) == 1 and len(tuned) == 1
    assert NAME not in base[0] and NAME in tuned[0]
