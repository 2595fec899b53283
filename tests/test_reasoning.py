"""Reasoning models (Qwen3-like ``<think>`` blocks) in chat and serve: the reasoning split from the
answer as the text streams, shown or hidden as asked, ``reasoning_content`` apart in the OpenAI
message, and ``enable_thinking`` reaching the chat template (chat flag, request's
``chat_template_kwargs``)."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest

from danlu.app.cli import main
from danlu.app.server import Service, build_service, create_app
from danlu.infer import Delta, Engine, Generation, RequestError
from danlu.infer.reasoning import ReasoningSplitter, opens_reasoning, split_reasoning
from server_helpers import GREEDY, HI, make_adapter, running, serve_args

# Qwen3's way: the model opens <think> itself; enable_thinking=false writes an empty block into the
# prompt. This one, like DeepSeek-R1's, opens the block in the prompt when thinking is on.
THINK_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{ '<think>\\n' }}{%- endif %}{%- endif %}"
)
REPLY = "<think>\nThe user greets me. 先想一想。\n</think>\n\nHello! 你好。"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_the_splitter_gives_the_same_parts_whatever_the_pieces(size):
    splitter = ReasoningSplitter()
    parts = [splitter.feed(REPLY[i : i + size]) for i in range(0, len(REPLY), size)] + [splitter.flush()]
    assert "".join(r for r, _ in parts).strip() == "The user greets me. 先想一想。"
    assert "".join(a for _, a in parts) == "Hello! 你好。"


@pytest.mark.parametrize(
    "text, inside, expected",
    [
        (REPLY, False, ("The user greets me. 先想一想。", "Hello! 你好。")),
        ("<think>\n\n</think>\n\nJust the answer.", False, (None, "Just the answer.")),  # thinking off
        ("Reasoning first.\n</think>\n\nThen this.", True, ("Reasoning first.", "Then this.")),
        ("No block here, <think> inside is text.", False, (None, "No block here, <think> inside is text.")),
        ("<thinking> is not the tag", False, (None, "<thinking> is not the tag")),
        ("<think>cut off before the end", False, ("cut off before the end", "")),
    ],
)
def test_split_reasoning(text, inside, expected):
    assert split_reasoning(text, inside) == expected


def test_a_prompt_that_opens_the_block_is_seen():
    assert opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_reasoning("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def think_adapter(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("think") / "final", seed=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = THINK_TEMPLATE
    tokenizer.save_pretrained(adapter)
    return adapter


@pytest.fixture(scope="module")
def engine(tiny_model_dir, think_adapter):
    e = Engine(str(tiny_model_dir), think_adapter, precision="fp32")
    yield e
    e.shutdown()


def test_enable_thinking_reaches_the_template_and_the_reply_knows_where_it_starts(engine):
    name = engine.primary
    on = engine.prompt_text(HI, name)
    off = engine.prompt_text(HI, name, template_kwargs={"enable_thinking": False})
    assert on.endswith("<think>\n") and off.endswith("<think>\n\n</think>\n\n")
    assert engine.chat(HI, GREEDY, name).reasoning_open
    assert not engine.chat(HI, GREEDY, name, template_kwargs={"enable_thinking": False}).reasoning_open
    with pytest.raises(RequestError, match="cannot set tokenize") as e:
        engine.chat(HI, GREEDY, name, template_kwargs={"tokenize": True})
    assert e.value.param == "chat_template_kwargs"


class Pieces:
    """An engine stand-in whose every reply is ``text``, streamed 3 characters at a time."""

    def __init__(self, text: str, reasoning_open: bool = False) -> None:
        self.text, self.reasoning_open = text, reasoning_open
        self.model_ref, self.adapter_names, self.adapter_dirs = "scripted", [], {}
        self.kwargs: list = []

    def chat(self, messages, settings, adapter, tools=None, asked=None, template_kwargs=None) -> Generation:
        self.kwargs.append(template_kwargs)
        gen = Generation(prompt_tokens=5, max_new_tokens=50)
        gen.reasoning_open = self.reasoning_open
        for i in range(0, len(self.text), 3):
            gen._push(Delta(self.text[i : i + 3]))
        gen.completion_tokens = 9
        gen._finish("stop")
        return gen


def stream_parts(client, **kw) -> tuple[str, str]:
    reasoning = content = ""
    for chunk in client.chat.completions.create(model="scripted", messages=HI, stream=True, **kw):
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
    return reasoning, content


def test_serve_returns_reasoning_content_apart_from_the_answer():
    fake = Pieces(REPLY)
    with running(create_app(Service(fake, "scripted", GREEDY))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        message = client.chat.completions.create(model="scripted", messages=HI).choices[0].message
        assert message.content == "Hello! 你好。"
        assert message.model_extra["reasoning_content"] == "The user greets me. 先想一想。"
        reasoning, content = stream_parts(client)
        assert reasoning.strip() == "The user greets me. 先想一想。" and content == "Hello! 你好。"
        kw = {"chat_template_kwargs": {"enable_thinking": False}}
        client.chat.completions.create(model="scripted", messages=HI, extra_body=kw)
        assert fake.kwargs[-1] == {"enable_thinking": False}  # handed to the engine as given


@pytest.mark.parametrize("mode", ["hidden", "raw"])
def test_serve_can_hide_the_reasoning_or_leave_it_as_written(mode):
    with running(create_app(Service(Pieces(REPLY), "scripted", GREEDY, mode))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        message = client.chat.completions.create(model="scripted", messages=HI).choices[0].message
        assert "reasoning_content" not in (message.model_extra or {})
        assert message.content == ("Hello! 你好。" if mode == "hidden" else REPLY)
        assert stream_parts(client) == (("", "Hello! 你好。") if mode == "hidden" else ("", REPLY))


def test_a_tool_call_after_the_reasoning_is_still_a_tool_call():
    text = '<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with running(create_app(Service(Pieces(text), "scripted", GREEDY))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        for stream in (False, True):
            body = {"model": "scripted", "messages": HI, "tools": tools, "stream": stream}
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
            if stream:
                deltas = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
                got = {k: v for d in deltas for k, v in d["choices"][0]["delta"].items() if v}
            else:
                got = r.json()["choices"][0]["message"]
            assert got["reasoning_content"] == "I need the weather."
            assert got["tool_calls"][0]["function"]["name"] == "get_weather"
        del client


def test_serve_end_to_end_thinking_on_and_off(tiny_model_dir, think_adapter):
    """The tiny model's greedy reply lands in reasoning_content when the template opened the block,
    and in content when the request turned thinking off."""
    service = build_service(serve_args(str(tiny_model_dir), [f"think={think_adapter}"]))
    engine = service.engine
    try:
        with running(create_app(service)) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
            kw = dict(model="think", messages=HI, temperature=0, max_tokens=GREEDY.max_new_tokens)
            on = client.chat.completions.create(**kw).choices[0].message
            expected_on = engine.chat(HI, GREEDY, "think").text().strip()
            assert expected_on and on.model_extra["reasoning_content"] == expected_on and on.content == ""
            off_kw = {"chat_template_kwargs": {"enable_thinking": False}}
            off = client.chat.completions.create(**kw, extra_body=off_kw).choices[0].message
            expected_off = engine.chat(HI, GREEDY, "think", template_kwargs={"enable_thinking": False}).text()
            assert off.content == expected_off and "reasoning_content" not in off.model_extra
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"tools": []}})
            assert e.value.body["param"] == "chat_template_kwargs"
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "flags, shown",
    [([], True), (["--hide-reasoning"], False), (["--no-thinking"], False)],
)
def test_chat_shows_or_hides_the_reasoning(think_adapter, monkeypatch, capsys, flags, shown):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/exit\n"))
    common = ["--temperature", "0", "--max-new-tokens", "4", "--precision", "fp32"]
    assert main(["chat", "--adapter", str(think_adapter), *common, *flags]) == 0
    out = capsys.readouterr().out
    assert ("[thinking] " in out and "[/thinking]" in out) is shown, out
    assert "<think>" not in out
    if "--no-thinking" in flags:
        assert "assistant> [thinking]" not in out and "assistant> \n" not in out  # an answer, printed


def test_serve_and_web_take_a_thinking_default_that_requests_override():
    from danlu.app.cli import build_parser
    from danlu.app.common import template_kwargs

    parser = build_parser()
    for verb in ("chat", "serve", "web"):
        assert template_kwargs(parser.parse_args([verb])) is None
        assert template_kwargs(parser.parse_args([verb, "--no-thinking"])) == {"enable_thinking": False}
        assert template_kwargs(parser.parse_args([verb, "--thinking"])) == {"enable_thinking": True}
    fake = Pieces(REPLY)
    service = Service(fake, "scripted", GREEDY, template_kwargs={"enable_thinking": False})
    with running(create_app(service)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        client.chat.completions.create(model="scripted", messages=HI)
        assert fake.kwargs[-1] == {"enable_thinking": False}
        on = {"chat_template_kwargs": {"enable_thinking": True}}
        client.chat.completions.create(model="scripted", messages=HI, extra_body=on)
        assert fake.kwargs[-1] == {"enable_thinking": True}


def test_tools_with_thinking_off_are_still_seen_by_the_template(tiny_model_dir, tmp_path):
    """The check that a template uses the tools compares renders with and without them, both with
    the request's template variables (else thinking off alone would look like the tools' doing)."""
    from transformers import AutoTokenizer

    adapter = make_adapter(tiny_model_dir, tmp_path / "final", seed=5)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tools_part = (
        "{%- if tools %}{{ 'Tools: ' }}{% for t in tools %}{{ t.function.name }} {% endfor %}{%- endif %}"
    )
    tokenizer.chat_template = tools_part + THINK_TEMPLATE
    tokenizer.save_pretrained(adapter)
    engine = Engine(str(tiny_model_dir), adapter, precision="fp32")
    try:
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
        off = {"enable_thinking": False}
        text = engine.prompt_text(HI, engine.primary, tools, off)
        assert text.startswith("Tools: get_weather") and text.endswith("</think>\n\n")
        # a template that ignores tools is still refused with thinking off
        tokenizer.chat_template = THINK_TEMPLATE
        tokenizer.save_pretrained(adapter)
        ignoring = Engine(str(tiny_model_dir), adapter, precision="fp32")
        with pytest.raises(RequestError, match="no place for tools"):
            ignoring.prompt_text(HI, ignoring.primary, tools, off)
        ignoring.shutdown()
    finally:
        engine.shutdown()
