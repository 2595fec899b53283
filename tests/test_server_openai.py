"""`danlu serve` and what OpenAI clients send: every parameter honoured as OpenAI defines it or
refused with a 400 that names it (never a 500), through the official ``openai`` client."""

# ruff: noqa: F811 - the shared fixtures (server_helpers) are test parameters here
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import server_helpers  # noqa: E402
from danlu.app.server import Service, create_app  # noqa: E402
from danlu.infer import Delta, Engine, Generation  # noqa: E402
from server_helpers import (  # noqa: E402
    GREEDY,
    HI,
    running,
)

# the shared fixtures, under the names pytest finds them by
adapters, client, service, url = (
    server_helpers.adapters,
    server_helpers.client,
    server_helpers.service,
    server_helpers.url,
)

# ------------------------------------------------------------------ 400, never 500

BIG = "x" * (1 << 20)
LONG = [{"role": "user", "content": "word " * 600}]  # over the tiny model's 512 positions


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/chat/completions", {"model": "a", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "a", "messages": [{"role": "robot", "content": "hi"}]},
            400,
            "messages[0].role",
        ),
        ("/v1/chat/completions", {"model": "a", "messages": HI, "n": 17}, 400, "n"),
        ("/v1/completions", {"model": "a", "prompt": ""}, 400, "prompt"),
        ("/v1/chat/completions", {"model": "nope", "messages": HI}, 404, "model"),
        ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": BIG}]}, 413, None),
        ("/v1/chat/completions", {"model": "a"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "a", "messages": HI, "temperature": 5}, 400, "temperature"),
        ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": "a", "messages": HI, "seed": 2**63}, 400, "seed"),
        ("/v1/chat/completions", {"model": "a", "messages": HI, "seed": 2**63, "stream": True}, 400, "seed"),
        ("/v1/chat/completions", {"model": "a", "messages": HI, "max_tokens": 10**40}, 400, "messages"),
        ("/v1/chat/completions", {"model": "a", "messages": HI, "top_k": 10**30, "max_tokens": 2}, 200, None),
        (
            "/v1/chat/completions",
            {"model": "a", "messages": HI, "stop": ["a", "b", "c", "d", "e"]},
            400,
            "stop",
        ),
        ("/v1/chat/completions", {"model": "a", "messages": HI, "logit_bias": {"x": 1}}, 400, "logit_bias"),
        (
            "/v1/chat/completions",
            {"model": "a", "messages": HI, "logit_bias": {"9999999": 1}},
            400,
            "logit_bias",
        ),
        ("/v1/chat/completions", {"model": "a", "messages": HI, "top_logprobs": 2}, 400, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"model": "a", "messages": HI, "logprobs": True, "top_logprobs": 21},
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": "a", "messages": HI, "presence_penalty": 3},
            400,
            "presence_penalty",
        ),
        (
            "/v1/chat/completions",
            {"model": "a", "messages": HI, "response_format": {"type": "json_object"}},
            400,
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "tools",
                "messages": HI,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "required",
            },
            400,
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            {"model": "a", "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            "tools",
        ),
        (
            "/v1/chat/completions",
            {"model": "tools", "messages": HI, "tools": [{"type": "nope"}]},
            400,
            "tools[0]",
        ),
        (
            "/v1/chat/completions",
            {"model": "tools", "messages": [{"role": "system", "content": "s"}, *HI]},
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "a",
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{nope"}}],
                    }
                ],
            },
            400,
            "messages[0].tool_calls[0]",
        ),
        ("/v1/chat/completions", {"model": "a", "messages": LONG}, 400, "messages"),
        ("/v1/chat/completions", {"model": "a", "messages": LONG, "stream": True}, 400, "messages"),
        ("/v1/chat/completions", {"model": "a", "messages": HI, "max_tokens": 500}, 400, "messages"),
        ("/v1/completions", {"model": "a", "prompt": "hi", "echo": True}, 400, "echo"),
        ("/v1/completions", {"model": "a", "prompt": [1, 2]}, 400, "prompt"),
        ("/v1/nowhere", {}, 404, None),
    ],
)
def test_bad_requests_get_openai_style_errors(url, path, body, status, param):
    r = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    if status == 200:
        return
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert "\n" not in error["message"]


def test_what_json_cannot_hold_is_a_400(url, client):
    cases = {
        b"{not json": "not valid JSON",
        b'{"model": "a", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}": "not valid JSON",
        b"[" * 50_000 + b"]" * 50_000: "nested too deeply",
        b'{"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}': "temperature",
    }
    for raw, said in cases.items():
        r = httpx.post(f"{url}/v1/chat/completions", content=raw, timeout=30)
        assert r.status_code == 400 and said in r.json()["error"]["message"], (raw[:40], r.text[:300])
    chunks = (b"x" * 65536 for _ in range(20))  # no Content-Length: counted while reading
    r = httpx.post(f"{url}/v1/chat/completions", content=chunks, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=HI)


def test_too_long_a_prompt_is_refused_with_the_numbers_before_any_work(url, client, service):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="a", messages=LONG, stream=True)
    error = e.value.body
    assert error["code"] == "context_length_exceeded" and "512" in error["message"]
    prompt = service.engine.encode(HI).shape[1]
    with pytest.raises(openai.BadRequestError, match=f"{prompt + 500} tokens"):
        client.chat.completions.create(model="a", messages=HI, max_tokens=500)
    # without max_tokens the reply is cut to what fits
    near = [{"role": "user", "content": "word " * (512 - prompt - 5)}]
    reply = client.chat.completions.create(model="a", messages=near, temperature=0)
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 512
    assert reply.choices[0].finish_reason == "length"


def test_a_chat_template_that_refuses_the_conversation_is_a_400(client):
    messages = [{"role": "system", "content": "Be brief."}, *HI]
    with pytest.raises(openai.BadRequestError, match="no system messages here"):
        client.chat.completions.create(model="tools", messages=messages)
    assert client.chat.completions.create(model="tools", messages=HI, max_tokens=2).choices[0].message.content


# ------------------------------------------------------------------ what OpenAI clients send


def test_stop_sequences_end_the_reply_before_them(client, service):
    whole = client.chat.completions.create(model="a", messages=HI, temperature=0, max_tokens=8)
    text = whole.choices[0].message.content
    cut = text[len(text) // 2 : len(text) // 2 + 3]
    assert cut.strip() and text.index(cut) > 0
    reply = client.chat.completions.create(
        model="a", messages=HI, temperature=0, max_tokens=8, stop=[cut, "zzzq"]
    )
    assert reply.choices[0].message.content == text[: text.index(cut)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="a", messages=HI, temperature=0, max_tokens=8, stop=cut, stream=True
    )
    pieces = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in streamed if c.choices]
    assert "".join(p for p, _ in pieces) == text[: text.index(cut)] and pieces[-1][1] == "stop"
    prompt = "Once upon a time"
    plain = client.completions.create(model="a", prompt=prompt, temperature=0, max_tokens=8).choices[0].text
    cut = plain[3:6]
    done = client.completions.create(model="a", prompt=prompt, temperature=0, max_tokens=8, stop=[cut])
    assert done.choices[0].text == plain[: plain.index(cut)] and done.choices[0].finish_reason == "stop"


def reference_greedy(
    engine: Engine, messages: list[dict], n: int, presence=0.0, frequency=0.0, bias=None, repetition=1.0
):
    """Greedy decoding with OpenAI's penalties (and transformers' repetition penalty), written out
    plainly: no cache, full forwards."""
    import torch

    ids = engine.prompt_ids(messages)
    out: list[int] = []
    with torch.inference_mode(), engine._model_lock, engine.registry.select(None):  # the bare base
        for _ in range(n):
            logits = engine.model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
            for t in set(ids + out):  # transformers' rule: over the prompt and the reply
                logits[t] = logits[t] * repetition if logits[t] < 0 else logits[t] / repetition
            for t in set(out):
                logits[t] -= out.count(t) * frequency + presence
            for t, v in (bias or {}).items():
                logits[t] += v
            out.append(int(logits.argmax()))
    return engine.tokenizer.decode(out, skip_special_tokens=True)


def test_presence_frequency_penalties_and_logit_bias_are_applied_as_openai_defines_them(client, service):
    engine = service.engine
    kw = dict(model=service.base_name, messages=HI, temperature=0, max_tokens=8)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    for presence, frequency in ((2.0, 0.0), (0.0, 2.0), (-2.0, 1.5)):
        got = client.chat.completions.create(**kw, presence_penalty=presence, frequency_penalty=frequency)
        assert got.choices[0].message.content == reference_greedy(engine, HI, 8, presence, frequency)
    want = engine.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    biased = client.chat.completions.create(**kw, logit_bias={str(want): 100})
    assert biased.choices[0].message.content == engine.tokenizer.decode([want] * 8)
    first = engine.tokenizer.encode(plain, add_special_tokens=False)[0]
    banned = client.chat.completions.create(**kw, logit_bias={str(first): -100}).choices[0].message.content
    assert banned == reference_greedy(engine, HI, 8, bias={first: -100}) and banned != plain
    # repetition_penalty (transformers'): a prompt token made the greedy pick by a bias loses to it
    logits = engine.logits(HI, use_adapter=False)[0, -1]
    prompt = engine.prompt_ids(HI)
    t = max(set(prompt) - {int(logits.argmax()), *engine.stop_ids}, key=lambda i: abs(float(logits[i])))
    lift = {t: float(logits.max() - logits[t]) + 0.5}  # t wins by 0.5 unless penalized
    kw["logit_bias"] = {str(t): lift[t]}
    lifted = client.chat.completions.create(**kw).choices[0].message.content
    assert lifted == reference_greedy(engine, HI, 8, bias=lift)
    repeated = client.chat.completions.create(**kw, extra_body={"repetition_penalty": 8.0})
    assert repeated.choices[0].message.content == reference_greedy(engine, HI, 8, bias=lift, repetition=8.0)
    assert repeated.choices[0].message.content != lifted


def test_logprobs_are_the_models_own(client, service):
    engine = service.engine
    reply = client.chat.completions.create(
        model=service.base_name, messages=HI, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 4 and "".join(c.token for c in content) == reply.choices[0].message.content
    expected = engine.logits(HI, use_adapter=False)[0, -1].log_softmax(-1)  # the bare base
    first = content[0]
    best = expected.topk(3)
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert first.logprob == pytest.approx(float(best.values[0]), abs=1e-4)  # greedy takes the top one
    assert first.bytes == list(first.token.encode())
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 3 for c in content)
    streamed = client.chat.completions.create(
        model=service.base_name, messages=HI, temperature=0, max_tokens=4, logprobs=True, stream=True
    )
    entries = [
        e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in entries] == [c.token for c in content]
    text = client.completions.create(
        model=service.base_name, prompt="Once upon", max_tokens=3, temperature=0, logprobs=2
    )
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) == 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == text.choices[0].text


def test_n_choices_with_seeds_are_reproducible(client, service):
    kw = dict(model="a", messages=HI, temperature=1.0, max_tokens=6, n=3, seed=7)
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens == 18
    streamed = client.chat.completions.create(**kw, stream=True)
    got = ["", "", ""]
    for c in streamed:
        for choice in c.choices:
            got[choice.index] += choice.delta.content or ""
    assert got == texts


def test_a_seed_gives_the_same_reply_alone_and_among_others(url, client):
    kw = dict(model="b", messages=HI, temperature=1.0, max_tokens=8, seed=123)
    alone = client.chat.completions.create(**kw).choices[0].message.content

    def busy(i: int) -> str:
        own = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        if i == 3:
            return own.chat.completions.create(**kw).choices[0].message.content
        return (
            own.chat.completions.create(
                model="b", messages=[{"role": "user", "content": f"{i}"}], max_tokens=8
            )
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(busy, range(6)))[3] == alone


def test_tools_reach_the_template_and_a_template_without_them_is_refused(client, service):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    plain = client.chat.completions.create(model="tools", messages=HI, max_tokens=1)
    with_tools = client.chat.completions.create(model="tools", messages=HI, max_tokens=1, tools=tools)
    ids = service.engine.prompt_ids(HI, "tools", tools)
    assert "Tools: get_weather" in service.engine.tokenizer.decode(ids)
    assert with_tools.usage.prompt_tokens == len(ids) > plain.usage.prompt_tokens
    none = client.chat.completions.create(
        model="a", messages=HI, max_tokens=1, tools=tools, tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError, match="no place for tools"):
        client.chat.completions.create(model="a", messages=HI, max_tokens=1, tools=tools)


class Scripted:
    """An engine stand-in whose every reply is a given text (the model's tool-call format)."""

    def __init__(self, engine: Engine, text: str) -> None:
        self.engine, self.text = engine, text
        self.model_ref, self.adapter_names, self.adapter_dirs = "scripted", [], {}
        self.seen: list = []

    def chat(self, messages, settings, adapter, tools=None, strict=False, template_kwargs=None) -> Generation:
        self.seen.append((messages, tools))
        gen = Generation(prompt_tokens=5, max_new_tokens=50)
        gen._push(Delta(self.text))
        gen.completion_tokens = 9
        gen._finish("stop")
        return gen


def test_tool_calls_in_the_models_format_come_back_as_openai_tool_calls(service):
    text = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    fake = Scripted(service.engine, text)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    history = [
        *HI,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    with running(create_app(Service(fake, "scripted", GREEDY))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="scripted", messages=history, tools=tools)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        messages, seen_tools = fake.seen[0]
        assert seen_tools == tools
        assert messages[1]["tool_calls"][0]["function"]["arguments"] == {
            "city": "Rome"
        }  # as templates take it
        assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
        chunks = list(client.chat.completions.create(model="scripted", messages=HI, tools=tools, stream=True))
        deltas = [c.choices[0] for c in chunks if c.choices]
        calls = [d.delta.tool_calls for d in deltas if d.delta.tool_calls]
        assert calls[0][0].function.name == "get_weather" and deltas[-1].finish_reason == "tool_calls"
        plain = client.chat.completions.create(model="scripted", messages=HI)  # no tools: text as it is
        assert plain.choices[0].message.content == text and plain.choices[0].message.tool_calls is None
