"""`danlu serve`: the OpenAI-compatible API, run for real (uvicorn on a free localhost port).

The official ``openai`` client talks to it. Most tests use the tiny random Llama (gibberish, but
deterministic at temperature 0) with two random LoRA adapters over it; one smoke test asks the
real embedded model a question.
"""

from __future__ import annotations

import argparse
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

from danlu.app.server import Service, build_service, create_app, parse_adapters  # noqa: E402
from danlu.errors import UserError  # noqa: E402
from danlu.infer import Engine, GenerationSettings  # noqa: E402

GREEDY = GenerationSettings(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
HI = [{"role": "user", "content": "Hello there"}]


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


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2))}


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
    assert [m.id for m in client.models.list().data] == [service.base_name, "a", "b"]


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


def test_32_parallel_clients_get_their_own_answers(url, client, service):
    models = [service.base_name, "a", "b"]
    jobs = [(models[i % 3], f"Question number {i}: what is {i} plus {i}?", i % 2 == 0) for i in range(32)]
    expected = [ask(client, m, q) for m, q, _ in jobs]
    assert len(set(expected)) > 16  # the prompts really differ

    def one(job: tuple[str, str, bool]) -> str:
        own = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        return ask(own, *job)

    with ThreadPoolExecutor(max_workers=32) as pool:
        got = list(pool.map(one, jobs))
    assert got == expected
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_client_that_goes_away_stops_its_generation(url, service):
    body = {"model": "a", "messages": HI, "max_tokens": 470, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                break  # hang up after a few tokens
    start = time.time()
    # 470 tokens take many seconds on a CPU; a cancelled generation frees the model within a token or two
    assert service.engine._lock.acquire(timeout=60)
    service.engine._lock.release()
    assert time.time() - start < 5
    assert ask(openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0), "a", "Hello there")


BIG = "x" * (1 << 20)


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
        ("/v1/chat/completions", {"model": "a", "messages": HI, "n": 2}, 400, "n"),
        ("/v1/completions", {"model": "a", "prompt": ""}, 400, "prompt"),
        ("/v1/chat/completions", {"model": "nope", "messages": HI}, 404, "model"),
        ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": BIG}]}, 413, None),
        ("/v1/chat/completions", {"model": "a"}, 422, "messages"),
        ("/v1/chat/completions", {"model": "a", "messages": HI, "temperature": 5}, 422, "temperature"),
        ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
        ("/v1/nowhere", {}, 404, None),
    ],
)
def test_bad_requests_get_openai_style_errors(url, path, body, status, param):
    r = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_invalid_json_and_chunked_oversized_bodies(url, client):
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    chunks = (b"x" * 65536 for _ in range(20))  # no Content-Length: counted while reading
    r = httpx.post(f"{url}/v1/chat/completions", content=chunks, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=HI)


def test_adapter_flags_are_checked(tmp_path):
    assert parse_adapters([f"x={tmp_path}", str(tmp_path)]) == {
        "x": str(tmp_path),
        str(tmp_path): str(tmp_path),
    }
    with pytest.raises(UserError, match="no such folder"):
        parse_adapters(["x=/no/such/dir"])
    with pytest.raises(UserError, match="used twice"):
        parse_adapters([f"x={tmp_path}", f"x={tmp_path}"])


def test_cli_serve_binds_localhost_and_requires_the_api_key(tiny_model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "danlu", "serve", "--model", str(tiny_model_dir), "--port", str(port)]
    cmd += ["--api-key", "sekrit", "--temperature", "0", "--max-new-tokens", "4", "--precision", "fp32"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy()
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
