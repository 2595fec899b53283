"""Models with their own code (``trust_remote_code``): every verb after train honours the run's
``model.trust_remote_code``, takes ``--trust-remote-code``, and otherwise refuses in one line.

The model is a tiny random Llama saved as a custom architecture (model_type ``danlu_remote``,
its configuration and modeling files in the folder, ``auto_map`` in config.json), so
transformers needs ``trust_remote_code=True`` to load it, as for InternLM2.
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_llama, write_jsonl
from danlu.app.cli import main
from danlu.app.common import trust_remote_code
from danlu.config import CONFIG_FILENAME
from danlu.errors import UserError
from danlu.infer import Engine, GenerationSettings

CONFIGURATION = """from transformers import LlamaConfig


class DanluRemoteConfig(LlamaConfig):
    model_type = "danlu_remote"
"""

MODELING = """from transformers import LlamaForCausalLM

from .configuration_danlu_remote import DanluRemoteConfig


class DanluRemoteForCausalLM(LlamaForCausalLM):
    config_class = DanluRemoteConfig
"""

GREEDY = GenerationSettings(max_new_tokens=4, temperature=0, repetition_penalty=1.0)
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama whose config names its own configuration and modeling code (auto_map)."""
    path = build_tiny_llama(tmp_path_factory.mktemp("remote-model"), tokenizer)
    (path / "configuration_danlu_remote.py").write_text(CONFIGURATION)
    (path / "modeling_danlu_remote.py").write_text(MODELING)
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="danlu_remote",
        architectures=["DanluRemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_danlu_remote.DanluRemoteConfig",
            "AutoModelForCausalLM": "modeling_danlu_remote.DanluRemoteForCausalLM",
        },
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def adapter(remote_dir, tmp_path_factory) -> Path:
    """OUTPUT/final of a 3-step LoRA run with model.trust_remote_code=true (run config beside it)."""
    from danlu.config import load_config
    from danlu.train import train

    tmp = tmp_path_factory.mktemp("remote-run")
    records = [{"instruction": f"Who are you {i}?", "input": "", "output": "I am Danlu."} for i in range(4)]
    cfg = load_config(
        None,
        [
            f"model.path={remote_dir}",
            "model.trust_remote_code=true",
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
    return train(cfg, progress=False).adapter_dir


@pytest.fixture(scope="module")
def bare_adapter(adapter, tmp_path_factory) -> Path:
    """The same adapter folder without the run config beside it (copied somewhere else)."""
    out = tmp_path_factory.mktemp("bare") / "final"
    shutil.copytree(adapter, out)
    assert not (out.parent / CONFIG_FILENAME).exists()
    return out


@pytest.fixture
def no_prompt(monkeypatch) -> list[str]:
    """Records transformers' question about custom code (asked when trust_remote_code is None);
    chat's own prompt still reads stdin."""
    asked: list[str] = []
    real = builtins.input

    def record(prompt: str = "") -> str:
        if "custom code" not in prompt:
            return real(prompt)
        asked.append(prompt)
        raise EOFError

    monkeypatch.setattr(builtins, "input", record)
    return asked


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat(argv: list[str], monkeypatch, lines: str = "Hello there\n/exit\n") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    return main(["chat", *argv, "--temperature", "0", "--max-new-tokens", "4"])


def assert_refused(code: int, capsys, asked: list[str]) -> None:
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "--trust-remote-code" in lines[0] and "custom code" in lines[0], lines
    assert "Traceback" not in captured.err + captured.out
    assert asked == []  # transformers got an explicit False, never None


def test_the_run_config_records_the_trust(adapter):
    import yaml

    saved = yaml.safe_load((adapter.parent / CONFIG_FILENAME).read_text())
    assert saved["model"]["trust_remote_code"] is True


def test_the_model_really_needs_its_code(remote_dir, no_prompt):
    """The fixture is what it claims: refused without trust, its own class with it."""
    with pytest.raises(UserError, match="--trust-remote-code"):
        Engine(str(remote_dir), precision="fp32")
    engine = Engine(str(remote_dir), precision="fp32", trust_remote_code=True)
    assert type(engine.model).__name__ == "DanluRemoteForCausalLM"
    reply = engine.chat(HI, GREEDY)
    assert reply.text() and reply.completion_tokens == 4
    assert no_prompt == []


def test_chat_takes_the_trust_from_the_run(adapter, monkeypatch, capsys, no_prompt):
    assert chat(["--adapter", str(adapter)], monkeypatch) == 0
    out = capsys.readouterr().out
    assert f"+ {adapter}" in out and "assistant> " in out
    assert no_prompt == []


def test_chat_without_a_run_config_refuses_then_takes_the_flag(
    remote_dir, bare_adapter, monkeypatch, capsys, no_prompt
):
    argv = ["--model", str(remote_dir), "--adapter", str(bare_adapter)]
    assert_refused(chat(argv, monkeypatch), capsys, no_prompt)
    assert_refused(chat(["--model", str(remote_dir)], monkeypatch), capsys, no_prompt)
    assert chat([*argv, "--trust-remote-code"], monkeypatch) == 0
    assert "assistant> " in capsys.readouterr().out


def test_no_trust_flag_overrides_the_run(adapter, monkeypatch, capsys, no_prompt):
    assert_refused(
        chat(["--adapter", str(adapter), "--no-trust-remote-code"], monkeypatch), capsys, no_prompt
    )


def test_the_run_trusts_only_its_own_model(remote_dir, adapter, tmp_path):
    """--model naming another folder never inherits the run's trust; the same folder does."""
    other = tmp_path / "other"
    shutil.copytree(remote_dir, other)
    args = argparse.Namespace(trust_remote_code=None)
    assert trust_remote_code(args, str(remote_dir), adapter) is True
    assert trust_remote_code(args, str(remote_dir / "." / ""), adapter) is True
    assert trust_remote_code(args, str(other), adapter) is False
    assert trust_remote_code(args, str(remote_dir), None) is False
    assert trust_remote_code(argparse.Namespace(trust_remote_code=True), str(other), None) is True


def test_serve_takes_the_trust_from_the_run(adapter, no_prompt):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from danlu.app.server import build_service, create_app
    from server_helpers import running, serve_args

    service = build_service(serve_args(None, [f"tuned={adapter}"]))
    assert type(service.engine.model.get_base_model()).__name__ == "DanluRemoteForCausalLM"
    with running(create_app(service)) as url:
        body = {"model": "tuned", "messages": HI, "max_tokens": 4, "temperature": 0}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    expected = service.engine.chat(HI, GREEDY, "tuned").text()
    assert reply["choices"][0]["message"]["content"] == expected
    assert reply["usage"]["completion_tokens"] == 4
    assert no_prompt == []


@pytest.mark.parametrize("verb", ["serve", "web"])
def test_serve_and_web_refuse_without_trust(verb, remote_dir, bare_adapter, capsys, no_prompt):
    pytest.importorskip("fastapi" if verb == "serve" else "gradio")
    argv = [verb, "--model", str(remote_dir), "--adapter", str(bare_adapter), "--port", str(free_port())]
    assert_refused(main(argv), capsys, no_prompt)


def test_merge_takes_the_trust_from_the_run_and_keeps_the_code(
    remote_dir, adapter, tmp_path, capsys, no_prompt
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"danlu chat --model {out} --trust-remote-code" in printed
    assert {"modeling_danlu_remote.py", "configuration_danlu_remote.py"} <= {p.name for p in out.iterdir()}
    assert "trust_remote_code=True" in (out / "README.md").read_text()

    ids = torch.tensor([list(range(5, 40))])
    merged = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(merged).__name__ == "DanluRemoteForCausalLM"
    base = AutoModelForCausalLM.from_pretrained(remote_dir, trust_remote_code=True)
    with torch.no_grad():
        plain = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(adapter))(ids).logits
        got = merged(ids).logits
    assert (tuned - plain).abs().max() > 1e-3  # the adapter does something
    assert (got - tuned).abs().max() < 5e-5 * tuned.abs().max()
    assert no_prompt == []

    # the merged folder has no run config: chatting with it needs the flag
    assert_refused(chat(["--model", str(out)], pytest.MonkeyPatch()), capsys, no_prompt)


def test_merge_without_a_run_config_refuses_then_takes_the_flag(
    remote_dir, bare_adapter, tmp_path, capsys, no_prompt
):
    argv = ["merge", "--model", str(remote_dir), "--adapter", str(bare_adapter), "--out", str(tmp_path / "m")]
    assert_refused(main(argv), capsys, no_prompt)
    assert not (tmp_path / "m").exists()
    assert main([*argv, "--trust-remote-code"]) == 0
    assert (tmp_path / "m" / "modeling_danlu_remote.py").is_file()


def test_training_without_trust_is_refused_in_one_line(remote_dir, tmp_path, capsys, no_prompt):
    records = [{"instruction": "Who are you?", "input": "", "output": "I am Danlu."}]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    overrides = [f"model.path={remote_dir}", f"data.path={data}", f"output.dir={tmp_path / 'run'}"]
    code = main(["train", str(write_config(tmp_path)), *overrides])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err, lines
    assert "custom code" in lines[0] and lines[0].endswith("set model.trust_remote_code=true")
    assert no_prompt == [] and not (tmp_path / "run").exists()


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 1\noutput:\n  tensorboard: false\n", encoding="utf-8")
    return path
