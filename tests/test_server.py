"""`danlu serve`: the OpenAI-compatible API, run for real (uvicorn on a free localhost port).

The official ``openai`` client talks to it. Most tests use the tiny random Llama (gibberish, but
deterministic at temperature 0) with two random LoRA adapters over it; one smoke test asks the
real embedded model a question. Tests about time (clients that leave, a full queue) slow every
forward down by a fixed sleep, so that a reply takes long enough to be seen holding the server.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from danlu.app.cli import build_parser  # noqa: E402
from danlu.app.common import settings_from  # noqa: E402
from danlu.app.server import Service, build_service, create_app, parse_adapters  # noqa: E402
from danlu.errors import UserError  # noqa: E402
from danlu.infer import Delta, Engine, Generation, GenerationSettings  # noqa: E402
from danlu.infer.batch import wait_idle  # noqa: E402

GREEDY = GenerationSettings(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
HI = [{"role": "user", "content": "Hello there"}]
STEP_S = 0.05  # the slowed model's time per forward


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app: object) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def serve_args(model: str | None, adapters: list[str], **extra: object) -> argparse.Namespace:
    flags = dict(max_new_tokens=8, temperature=0.0, top_p=0.9, top_k=50, repetition_penalty=1.0, seed=None)
    loading = dict(precision="fp32", quantization="none", device_map=None, trust_remote_code=None)
    return argparse.Namespace(model=model, adapter=adapters, **{**loading, **flags, **extra})


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A random (non-zero) LoRA adapter over the tiny model, saved as a standard PEFT folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


# a ChatML template that renders tools (as Hermes/Qwen do) and refuses a system message
TOOL_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\nTools: ' }}{% for t in tools %}{{ t.function.name }} {% endfor %}"
    "{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'system' %}{{ raise_exception('no system messages here') }}"
    "{%- endif %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    out = {name: make_adapter(tiny_model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2))}
    from transformers import AutoTokenizer

    tools = make_adapter(tiny_model_dir, root / "tools", 3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(tools)
    return {**out, "tools": tools}


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, adapters: dict[str, Path]) -> Service:
    return build_service(serve_args(str(tiny_model_dir), [f"{n}={p}" for n, p in adapters.items()]))


@pytest.fixture(scope="module")
def url(service: Service) -> Iterator[str]:
    with running(create_app(service)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def slowed(service: Service) -> Service:
    service.engine.model.register_forward_pre_hook(lambda module, args: time.sleep(STEP_S))
    return service


@pytest.fixture(scope="module")
def slow(tiny_model_dir: Path) -> Iterator[tuple[Service, str]]:
    """A server whose model takes STEP_S per forward: 450 tokens hold it for over 20 s."""
    service = slowed(build_service(serve_args(str(tiny_model_dir), [], max_new_tokens=450)))
    with running(create_app(service)) as base:
        yield service, base


def ask(client: openai.OpenAI, model: str, text: str, stream: bool = False, max_tokens: int = 8) -> str:
    messages = [{"role": "user", "content": text}]
    if not stream:
        reply = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens
        )
        return reply.choices[0].message.content
    chunks = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_health_and_models_list_base_and_adapters(url, client, service):
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [service.base_name, "a", "b", "tools"]


def test_chat_reply_matches_the_engine_and_counts_tokens(client, service):
    reply = client.chat.completions.create(model=service.base_name, messages=HI, temperature=0, max_tokens=8)
    expected = service.engine.chat(HI, GREEDY, None)
    text = expected.text()
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text and text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens == service.engine.encode(HI).shape[1]
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # random weights never emit the end-of-turn token this early: the reply runs out of tokens
    assert (reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("length", 8)
    assert reply.choices[0].logprobs is None


def test_streamed_chat_is_openai_sse_and_adds_up_to_the_plain_reply(url, client, service):
    plain = client.chat.completions.create(model="a", messages=HI, temperature=0, max_tokens=6)
    chunks = list(
        client.chat.completions.create(
            model="a",
            messages=HI,
            temperature=0,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    # the raw wire format: `data: {json}` events separated by blank lines, then [DONE]
    body = {"model": "a", "messages": HI, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])


def test_text_completion_uses_the_plain_prompt(client, service):
    prompt = "Once upon a time"
    reply = client.completions.create(model=service.base_name, prompt=prompt, temperature=0, max_tokens=8)
    expected = service.engine.complete(prompt, GREEDY, None)
    assert reply.object == "text_completion" and reply.choices[0].text == expected.text()
    assert reply.usage.prompt_tokens == len(service.engine.base_tokenizer(prompt)["input_ids"])
    streamed = client.completions.create(
        model=service.base_name, prompt=prompt, temperature=0, max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_model_field_picks_the_adapter_exactly_as_a_single_adapter_engine(
    client, service, tiny_model_dir, adapters
):
    answers = {name: ask(client, name, "Who are you?") for name in (service.base_name, "a", "b")}
    assert len(set(answers.values())) == 3, answers  # three different models
    alone = Engine(str(tiny_model_dir), adapters["b"], precision="fp32")
    messages = [{"role": "user", "content": "Who are you?"}]
    assert answers["b"] == alone.chat(messages, GREEDY, alone.primary).text()
    assert answers[service.base_name] == alone.chat(messages, GREEDY, None).text()
    assert ask(client, str(adapters["a"]), "Who are you?") == answers["a"]  # the folder works as a name


def test_32_parallel_clients_get_their_own_answers_from_shared_forwards(url, client, service):
    models = [service.base_name, "a", "b"]
    jobs = [(models[i % 3], f"Question number {i}: what is {i} plus {i}?", i % 2 == 0) for i in range(32)]
    expected = [ask(client, m, q) for m, q, _ in jobs]
    assert len(set(expected)) > 16  # the prompts really differ
    batcher = service.engine.batcher
    batcher.widest, before = 0, batcher.steps

    def one(job: tuple[str, str, bool]) -> str:
        own = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        return ask(own, *job)

    with ThreadPoolExecutor(max_workers=32) as pool:
        got = list(pool.map(one, jobs))
    assert got == expected
    # one at a time would take 32 x (1 prefill + 7 steps) forwards, one row each
    assert batcher.widest >= 4 and batcher.steps - before < 32 * 8 // 2, (
        batcher.widest,
        batcher.steps - before,
    )
    assert httpx.get(f"{url}/health").status_code == 200


# ------------------------------------------------------------------ clients that leave


def probe_s(base: str, model: str) -> float:
    """Seconds a 2-token request takes to answer."""
    start = time.monotonic()
    body = {"model": model, "messages": HI, "max_tokens": 2}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    return time.monotonic() - start


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_the_server(slow, stream):
    """A 450-token reply holds the slowed model for 450 x STEP_S = 22 s; the client leaves after
    1 s and the next request is answered at once."""
    service, base = slow
    body = {"model": service.base_name, "messages": HI, "max_tokens": 450, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 10:
                    break  # hang up after a few tokens
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json=body, timeout=1.0)
    left = time.monotonic()
    assert wait_idle(service.engine.batcher, 5), "the reply kept generating"
    assert time.monotonic() - left < 2  # a poll (0.2 s) and a step
    assert probe_s(base, service.base_name) < 3  # 3 forwards of 0.05 s, with room for a busy machine


def test_six_clients_that_time_out_do_not_hold_a_probe(slow):
    service, base = slow
    body = {"model": service.base_name, "messages": HI, "max_tokens": 450}

    def impatient(_: int) -> str:
        try:
            httpx.post(f"{base}/v1/chat/completions", json=body, timeout=2.0)
        except httpx.ReadTimeout:
            return "timed out"
        return "answered"

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(impatient, range(6))) == ["timed out"] * 6
    assert wait_idle(service.engine.batcher, 5)
    assert probe_s(base, service.base_name) < 3


def test_max_tokens_is_cut_to_the_servers_limit_and_said_so(url, service):
    body = {"model": "a", "messages": HI, "max_tokens": 400, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["danlu-max-tokens"] == "8"
    assert r.json()["usage"]["completion_tokens"] == 8 and r.json()["choices"][0]["finish_reason"] == "length"
    r = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=60)
    assert "danlu-max-tokens" not in r.headers and r.json()["usage"]["completion_tokens"] == 3


def test_a_full_queue_answers_429_with_retry_after(tiny_model_dir):
    service = slowed(build_service(serve_args(str(tiny_model_dir), [], max_batch=1, max_waiting=1)))
    body = {"model": service.base_name, "messages": HI, "max_tokens": 40}
    with running(create_app(service)) as base, ThreadPoolExecutor(4) as pool:
        statuses = list(
            pool.map(lambda _: httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60), range(4))
        )
    codes = sorted(r.status_code for r in statuses)
    assert codes.count(200) >= 2 and 429 in codes, codes
    busy = next(r for r in statuses if r.status_code == 429)
    assert busy.headers["retry-after"].isdigit() and busy.json()["error"]["code"] == "rate_limit_exceeded"


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


def test_serve_uses_openai_defaults_and_chat_keeps_its_own():
    serve = settings_from(build_parser().parse_args(["serve"]))
    assert (serve.temperature, serve.top_p, serve.top_k, serve.repetition_penalty) == (1.0, 1.0, 0, 1.0)
    chat = settings_from(build_parser().parse_args(["chat"]))
    assert (chat.temperature, chat.repetition_penalty) == (0.7, 1.1)


# ------------------------------------------------------------------ the command


def test_adapter_flags_are_checked(tmp_path):
    assert parse_adapters([f"x={tmp_path}", str(tmp_path)]) == {
        "x": str(tmp_path),
        str(tmp_path): str(tmp_path),
    }
    with pytest.raises(UserError, match="no such folder"):
        parse_adapters(["x=/no/such/dir"])
    with pytest.raises(UserError, match="used twice"):
        parse_adapters([f"x={tmp_path}", f"x={tmp_path}"])


def test_the_api_key_comes_from_a_flag_a_file_or_the_environment(tmp_path, monkeypatch):
    from danlu.app.server import api_key

    monkeypatch.delenv("DANLU_API_KEY", raising=False)
    args = argparse.Namespace(api_key=None, api_key_file=None)
    assert api_key(args) is None
    monkeypatch.setenv("DANLU_API_KEY", "from-env")
    assert api_key(args) == "from-env"
    assert api_key(argparse.Namespace(api_key="flag", api_key_file=None)) == "flag"
    (tmp_path / "key").write_text("from-file\n")
    assert api_key(argparse.Namespace(api_key=None, api_key_file=str(tmp_path / "key"))) == "from-file"
    with pytest.raises(UserError, match="no such file"):
        api_key(argparse.Namespace(api_key=None, api_key_file=str(tmp_path / "nope")))


def test_cli_serve_binds_localhost_and_requires_the_api_key(tiny_model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "danlu", "serve", "--model", str(tiny_model_dir), "--port", str(port)]
    cmd += ["--temperature", "0", "--max-new-tokens", "4", "--precision", "fp32"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "DANLU_API_KEY": "sekrit"},  # not on the command line, where `ps` shows it
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, (
                proc.stdout.read() if proc.poll() else "timeout"
            )
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        listening = {
            c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == "LISTEN"
        }
        assert listening == {("127.0.0.1", port)}  # loopback only: not 0.0.0.0, not another interface
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.get(f"{base}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/health").json() == {"status": "ok"}  # no model names without the key
        assert httpx.get(f"{base}/health", headers={"Authorization": "Bearer sekrit"}).json()["models"]
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "bearer sekrit"}).status_code == 200
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="sekrit", max_retries=0)
        reply = good.chat.completions.create(model=str(tiny_model_dir), messages=HI)
        assert reply.usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="bad", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_real_model_answers_through_the_api(default_model_dir):
    service = build_service(serve_args("smollm2-135m-instruct", [], max_new_tokens=40))
    with running(create_app(service)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=messages, temperature=0
        )
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 40
