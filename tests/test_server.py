"""`danlu serve`: the OpenAI-compatible API, run for real (uvicorn on a free localhost port): the
basics, many clients at once, clients that leave, the queue's limit, the defaults and the command.

The official ``openai`` client talks to it. Most tests use the tiny random Llama (gibberish, but
deterministic at temperature 0) with random LoRA adapters over it; one smoke test asks the real
embedded model a question. Tests about time (clients that leave, a full queue) slow every forward
down by a fixed sleep, so that a reply takes long enough to be seen holding the server. What OpenAI
clients send, parameter by parameter, and the 400s: ``test_server_openai.py``; the shared server,
adapters and client: ``server_helpers.py``.
"""

# ruff: noqa: F811 - the shared fixtures (server_helpers) are test parameters here
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import server_helpers  # noqa: E402
from danlu.app.cli import build_parser  # noqa: E402
from danlu.app.common import settings_from  # noqa: E402
from danlu.app.server import build_service, create_app, parse_adapters  # noqa: E402
from danlu.errors import UserError  # noqa: E402
from danlu.infer import Engine  # noqa: E402
from danlu.infer.batch import wait_idle  # noqa: E402
from server_helpers import (  # noqa: E402
    GREEDY,
    HI,
    ask,
    free_port,
    running,
    serve_args,
    slowed,
)

# the shared fixtures, under the names pytest finds them by
adapters, client, service, slow, url = (
    server_helpers.adapters,
    server_helpers.client,
    server_helpers.service,
    server_helpers.slow,
    server_helpers.url,
)


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
