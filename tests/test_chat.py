"""`danlu chat` in the terminal: Ctrl-C stops a reply and keeps the conversation; a conversation the
chat template refuses is one line, and the chat goes on.

The Ctrl-C test runs the real command in a child process and sends it SIGINT, with every forward
slowed by 0.05 s so that a reply lasts long enough to be interrupted.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from danlu.app.cli import main
from danlu.infer import Engine, GenerationSettings

# the child takes Ctrl-C as a terminal's user would send it, even where the suite itself runs with
# SIGINT ignored (started in the background from a script: `make test &`), which it would inherit
SLOWED = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from danlu.infer import batch
real = batch.Batcher._forward
def slow(self, *args):
    time.sleep(0.05)
    return real(self, *args)
batch.Batcher._forward = slow
from danlu.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Console:
    """A child process's output, read as it comes, and its input."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.out = proc, ""
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 4096):
            with self.lock:
                self.out += chunk.decode(errors="replace")

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = re.compile(pattern, re.S).search(self.out, after)
            if found:
                return found
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.out[-500:]}"
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} in {self.out[-500:]!r}")

    def type(self, line: str) -> None:
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(tiny_model_dir):
    flags = [
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--max-new-tokens",
        "400",
        "--precision",
        "fp32",
    ]
    cmd = [sys.executable, "-u", "-c", SLOWED, "chat", "--model", str(tiny_model_dir), *flags]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = Console(proc)
    try:
        console.wait_for(r"you> ", timeout=120)
        console.type("Hello there")
        start = console.wait_for(r"assistant> ").end()
        console.wait_for(r"\S{12}", after=start)  # some of the 400-token reply (20 s at 0.05 s a token)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        stopped = console.wait_for(r" \[stopped\]\n", after=start)
        console.wait_for(r"you> ", after=stopped.end())
        assert time.monotonic() - sent < 3  # one token's time, with room for a busy machine
        partial = console.out[start : stopped.start()]
        assert 0 < len(partial.split()) and proc.poll() is None  # still running, the reply cut short

        # the next turn is answered with the interrupted one in the history
        console.type("And then?")
        second = console.wait_for(r"assistant> ", after=stopped.end()).end()
        engine = Engine(str(tiny_model_dir), precision="fp32")
        history = [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": partial.strip()},
            {"role": "user", "content": "And then?"},
        ]
        expected = engine.reply(
            history, GenerationSettings(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
        )
        console.wait_for(re.escape(expected), after=second, timeout=60)
        proc.send_signal(signal.SIGINT)
        console.wait_for(r"you> ", after=second)
        proc.send_signal(signal.SIGINT)  # at the prompt: leave
        assert proc.wait(30) == 0, console.out[-500:]
        assert "terminate called" not in console.out and "Traceback" not in console.out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_conversation_the_template_refuses_is_one_line_and_the_chat_goes_on(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from transformers import AutoTokenizer

    from server_helpers import TOOL_TEMPLATE, make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOL_TEMPLATE  # raises on a system message
    tokenizer.save_pretrained(adapter)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/system\nHello there\n/exit\n"))
    flags = ["--temperature", "0", "--max-new-tokens", "3", "--precision", "fp32"]
    assert main(["chat", "--adapter", str(adapter), "--system", "Be brief.", *flags]) == 0
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no system messages here" in errors[0], out
    assert "(system prompt cleared; conversation cleared)" in out
    assert re.search(r"assistant> \S", out), out  # without the system prompt it answers


@pytest.mark.parametrize("verb", ["chat", "web"])
def test_chat_and_web_keep_their_own_sampling_defaults(verb):
    from danlu.app.cli import build_parser
    from danlu.app.common import settings_from

    s = settings_from(build_parser().parse_args([verb]))
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.max_new_tokens) == (
        0.7,
        0.9,
        50,
        1.1,
        256,
    )
