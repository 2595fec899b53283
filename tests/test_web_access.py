"""Who can reach `danlu web` and `danlu serve`: a warning when they listen beyond this machine with
nothing guarding them, what --share exposes, and the web page's password (Gradio's login)."""

from __future__ import annotations

import os
import socket

import httpx
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

from danlu.app.cli import main  # noqa: E402
from danlu.app.common import exposure_lines, exposure_warning, is_loopback, login  # noqa: E402
from danlu.app.web import build_demo  # noqa: E402
from danlu.infer import Engine, GenerationSettings  # noqa: E402

GREEDY = GenerationSettings(max_new_tokens=4, temperature=0, repetition_penalty=1.0)


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.0.1.1", True), ("localhost", True), ("::1", True)]
    + [("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("my-box.lan", False)],
)
def test_only_this_machine_counts_as_loopback(host, loopback):
    assert is_loopback(host) is loopback
    warned = exposure_warning(host, False, "a password")
    assert (warned is None) is loopback
    assert exposure_warning(host, True, "a password") is None  # guarded: nothing to say


def test_web_says_what_it_is_open_to():
    web = ("chat with this model", "DANLU_WEB_PASSWORD")
    assert exposure_lines("127.0.0.1", False, False, *web) == []
    [line] = exposure_lines("0.0.0.0", False, False, *web)
    assert (
        line.startswith("warning: listening on 0.0.0.0 without a password") and "DANLU_WEB_PASSWORD" in line
    )
    assert exposure_lines("0.0.0.0", False, True, *web) == []
    [share] = exposure_lines("127.0.0.1", True, False, *web)
    assert "gradio.live" in share and "anyone with the link can chat" in share and "set a password" in share
    assert "set a password" not in exposure_lines("127.0.0.1", True, True, *web)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_password_puts_a_login_in_front_of_the_page(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), precision="fp32")
    demo = build_demo(engine, GREEDY, label="tiny")
    port = free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        **login("s3cret", "danlu web"),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/config").status_code == 401  # nothing without logging in
        wrong = httpx.post(f"{url}/login", data={"username": "me", "password": "guess"})
        assert wrong.status_code == 400
        with httpx.Client() as client:
            right = client.post(f"{url}/login", data={"username": "anyone", "password": "s3cret"})
            assert right.status_code == 200
            assert client.get(f"{url}/config").status_code == 200
    finally:
        demo.close()
        engine.shutdown()
    assert login(None, "danlu web") == {} and login("", "danlu web") == {}


def test_cli_web_warns_off_loopback_and_passes_the_password(tiny_model_dir, tmp_path, monkeypatch, capsys):
    launched: list[dict] = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.append(kw))
    monkeypatch.delenv("DANLU_WEB_PASSWORD", raising=False)
    base = ["web", "--model", str(tiny_model_dir), "--precision", "fp32", "--port", str(free_port())]
    assert main([*base, "--host", "0.0.0.0"]) == 0
    assert "warning: listening on 0.0.0.0 without a password" in capsys.readouterr().out
    assert "auth" not in launched[-1] and launched[-1]["server_name"] == "0.0.0.0"

    monkeypatch.setenv("DANLU_WEB_PASSWORD", "from-env")
    assert main([*base, "--host", "0.0.0.0"]) == 0
    assert "warning" not in capsys.readouterr().out
    check = launched[-1]["auth"]
    assert check("x", "from-env") and not check("x", "other")

    (tmp_path / "pw").write_text("from-file\n", encoding="utf-8")
    assert main([*base, "--password-file", str(tmp_path / "pw")]) == 0
    assert launched[-1]["auth"]("x", "from-file")
    assert main([*base, "--password-file", str(tmp_path / "missing")]) == 2
    assert "--password-file" in capsys.readouterr().err


def test_cli_board_warns_off_loopback_and_passes_the_password(tmp_path, monkeypatch, capsys):
    """The board starts runs and servers: off this machine it says so, and takes a password."""
    launched: list[dict] = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.append(kw))
    monkeypatch.delenv("DANLU_BOARD_PASSWORD", raising=False)
    base = ["board", "--runs", str(tmp_path / "out"), "--port", str(free_port())]
    assert main([*base, "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    assert "warning: listening on 0.0.0.0 without a password (--password-file, DANLU_BOARD_PASSWORD)" in out
    assert "auth" not in launched[-1] and launched[-1]["server_name"] == "0.0.0.0"
    assert main([*base, "--share"]) == 0
    assert (
        "anyone with the link can start training runs and servers on this machine" in capsys.readouterr().out
    )
    monkeypatch.setenv("DANLU_BOARD_PASSWORD", "from-env")
    assert main([*base, "--host", "0.0.0.0"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert launched[-1]["auth"]("x", "from-env") and not launched[-1]["auth"]("x", "other")
    assert "danlu board" in launched[-1]["auth_message"]


def test_cli_serve_warns_off_loopback_without_an_api_key(tiny_model_dir, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.delenv("DANLU_API_KEY", raising=False)
    base = ["serve", "--model", str(tiny_model_dir), "--precision", "fp32", "--port", str(free_port())]
    assert main([*base, "--host", "0.0.0.0"]) == 0
    assert "warning: listening on 0.0.0.0 without an API key" in capsys.readouterr().out
    monkeypatch.setenv("DANLU_API_KEY", "k")
    assert main([*base, "--host", "0.0.0.0"]) == 0
    assert main(base) == 0
    monkeypatch.delenv("DANLU_API_KEY")
    assert main(base) == 0  # 127.0.0.1: nothing to warn about
    assert "warning" not in capsys.readouterr().out
