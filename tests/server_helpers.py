"""What the `danlu serve` tests share: a uvicorn server on a free localhost port, the tiny model's
service with random LoRA adapters (one with a tool-rendering template), the official ``openai``
client, and a slowed server for the tests about time (each forward sleeps STEP_S)."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from danlu.app.server import Service, build_service, create_app  # noqa: E402
from danlu.infer import GenerationSettings  # noqa: E402

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
