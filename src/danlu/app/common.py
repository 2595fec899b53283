"""What the ``danlu`` verbs share: loading and sampling flags, the base of an adapter and whether
its run trusted the model's own code, chat content as text, keys and passwords, whether an address is
this machine only, a free port, and a quiet console. Every verb module may
import this one; it imports no verb.

Kept light on purpose: importing it (as ``danlu --help`` does through every verb's parser)
loads neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from danlu.config import CONFIG_FILENAME, DEFAULT_MODEL

if TYPE_CHECKING:
    from danlu.infer import GenerationSettings

# libraries whose own log lines are not the user's to act on (the real errors still come through)
NOISY = ("transformers", "peft", "accelerate", "torch", "httpx", "bitsandbytes")
# DeepSpeed sets its logger's level itself when imported, so its one line about the CPU is filtered
DEEPSPEED_ON_CPU = "Setting accelerator to CPU"


class _Drop(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_libraries() -> None:
    """danlu's own progress and messages only: library progress bars, info and warning chatter off.

    bitsandbytes logs a warning on CPUs with AVX512-BF16 that an optional hub kernel is missing,
    and DeepSpeed one that it picked the CPU: neither is for the user to act on.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="danlu: %(message)s")
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _Drop) for f in deepspeed.filters):
        deepspeed.addFilter(_Drop(DEEPSPEED_ON_CPU))
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def add_generation_flags(p: argparse.ArgumentParser, api: bool = False) -> None:
    """Sampling flags of the verbs that generate (chat, serve, web).

    ``api``: OpenAI's defaults (temperature 1, top-p 1, no top-k, no repetition penalty), for
    `danlu serve`, whose clients expect them; ``--max-new-tokens`` is then also the most a
    request may ask for.
    """
    g = p.add_argument_group("generation")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=1024 if api else 256,
        help="the most a request gets, and its default" if api else None,
    )
    g.add_argument("--temperature", type=float, default=1.0 if api else 0.7, help="0 for greedy decoding")
    g.add_argument("--top-p", type=float, default=1.0 if api else 0.9)
    g.add_argument("--top-k", type=int, default=0 if api else 50, help="0: off")
    g.add_argument("--repetition-penalty", type=float, default=1.0 if api else 1.1, help="1: off")
    g.add_argument("--seed", type=int, default=None)


def add_thinking_flag(p: Any) -> None:
    """``--thinking`` / ``--no-thinking``: ``enable_thinking`` handed to the chat template."""
    p.add_argument(
        "--thinking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ask the chat template to let the model reason first, or not (enable_thinking, as Qwen3's "
        "template reads it); default: the template's own default",
    )


def template_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """The chat template's extra variables :func:`add_thinking_flag` asks for (None: none)."""
    thinking = getattr(args, "thinking", None)
    return None if thinking is None else {"enable_thinking": thinking}


def add_trust_flag(p: Any) -> None:
    """``--trust-remote-code`` / ``--no-trust-remote-code`` on a parser or argument group."""
    p.add_argument(
        "--trust-remote-code",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the model folder's own Python code (custom architectures, e.g. InternLM2); "
        "default: what the adapter's run config says (model.trust_remote_code), else off",
    )


def add_loading_flags(p: argparse.ArgumentParser) -> None:
    """How chat, serve and web load the model: precision, quantization, GPUs, custom code."""
    g = p.add_argument_group("loading")
    add_trust_flag(g)
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    g.add_argument(
        "--quantization",
        default="none",
        choices=["none", "nf4", "fp4", "int8"],
        help="load the base in 4 or 8 bits with bitsandbytes (less memory; adapters still apply)",
    )
    g.add_argument(
        "--device-map",
        default=None,
        choices=["auto"],
        help="auto: spread the model over every visible GPU (for models larger than one card)",
    )


def add_model_flags(p: argparse.ArgumentParser, adapter_help: str) -> None:
    """``--model`` (defaulting to the adapter's base) and ``--adapter``."""
    p.add_argument(
        "--model",
        default=None,
        help=f"alias, folder or hub id (default: the adapter's base, else {DEFAULT_MODEL})",
    )
    p.add_argument("--adapter", default=None, help=adapter_help)


def loading_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Engine keyword arguments of :func:`add_loading_flags`."""
    return {"precision": args.precision, "quantization": args.quantization, "device_map": args.device_map}


def settings_from(args: argparse.Namespace) -> GenerationSettings:
    """The Engine's sampling settings from :func:`add_generation_flags`."""
    from danlu.infer import GenerationSettings

    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def run_model_section(adapter: str | Path) -> dict[str, Any] | None:
    """The ``model`` section of the run config saved next to an adapter (``OUTPUT/final``), if any."""
    run_config = Path(adapter).parent / CONFIG_FILENAME
    if not run_config.is_file():
        return None
    import yaml

    return (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("model") or {}


def base_of_adapter(adapter: str | Path) -> str | None:
    """The base model an adapter was trained on: the run's config, else the PEFT metadata."""
    path = Path(adapter)
    section = run_model_section(path)
    if section is not None:
        return section.get("path")
    meta = path / "adapter_config.json"
    if meta.is_file():
        return json.loads(meta.read_text(encoding="utf-8")).get("base_model_name_or_path")
    return None


def model_for(args: argparse.Namespace, adapter: str | Path | None) -> str:
    """``--model``, else the adapter's base, else the default model."""
    return args.model or (base_of_adapter(adapter) if adapter else None) or DEFAULT_MODEL


def _same_model(a: str, b: str) -> bool:
    """Whether two model references name the same thing (equal, or the same folder)."""
    if not a or not b or a == b:
        return bool(a) and a == b
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def trust_remote_code(args: argparse.Namespace, model: str, adapter: str | Path | None) -> bool:
    """Whether ``model`` may run its own code: the flag when given, else the adapter's run config.

    The run's ``model.trust_remote_code`` counts only for the model that run trained (so
    ``--model`` naming another one never inherits the trust). Always a bool: transformers
    asks interactively when given None.
    """
    if args.trust_remote_code is not None:
        return bool(args.trust_remote_code)
    section = run_model_section(adapter) if adapter else None
    if not section or not section.get("trust_remote_code"):
        return False
    return _same_model(model, str(section.get("path") or ""))


def content_text(content: Any) -> str:
    """Chat history content as Gradio keeps it (a string, a content part, or a list of them) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list | tuple):
        return "".join(content_text(part) for part in content)
    return ""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, guarded: bool, guard: str) -> str | None:
    """The one-line warning for a server that listens beyond this machine with nothing guarding it."""
    if guarded or is_loopback(host):
        return None
    return f"warning: listening on {host} without {guard}: anyone who can reach this machine can use it"


def login(password: str | None, page: str) -> dict[str, Any]:
    """Gradio's login options for ``password`` (any user name): nothing when there is none."""
    if not password:
        return {}
    import secrets

    def check(_user: str, given: str) -> bool:
        return secrets.compare_digest(given.encode(), password.encode())

    return {"auth": check, "auth_message": f"{page}: any user name, and the page's password"}


def exposure_lines(host: str, share: bool, guarded: bool, reach: str, env: str) -> list[str]:
    """What a Gradio page is open to, when more than this machine: one line each. ``reach``: what
    a visitor can do there ("chat with this model"); ``env``: the variable its password is read from."""
    guard = f"a password (--password-file, {env})"
    lines = [line for line in [exposure_warning(host, guarded, guard)] if line]
    if share:
        said = f"anyone with the link can {reach} through Gradio's servers"
        lines.append(
            f"--share: a public gradio.live link is opened; {said}" + ("" if guarded else f", set {guard}")
        )
    return lines


def add_password_flags(p: Any, env: str) -> None:
    """``--password`` / ``--password-file`` of a Gradio page (``env`` read when neither is given)."""
    p.add_argument(
        "--password",
        default=None,
        help="require this password to open the page (any user name); visible in ps, so prefer "
        f"--password-file or {env}",
    )
    p.add_argument(
        "--password-file", default=None, metavar="PATH", help="read the page's password from a file"
    )


def read_secret(value: str | None, path: str | None, env: str, file_flag: str) -> str | None:
    """A key or password: from the file at ``path`` (kept out of ``ps``), else ``value`` (a flag),
    else the environment variable ``env``; None when none is given."""
    from danlu.errors import UserError

    if path:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"{file_flag} {file}: no such file")
        secret = file.read_text(encoding="utf-8").strip()
        if not secret:
            raise UserError(f"{file_flag} {file}: the file is empty")
        return secret
    return value or os.environ.get(env) or None


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
