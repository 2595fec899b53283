"""An Ollama Modelfile for an exported GGUF: FROM, the chat template as Go TEMPLATE, stop tokens.

Ollama does not run the Jinja chat template inside the GGUF; it renders a Go ``text/template``
over ``.Messages``. danlu derives that TEMPLATE from the tokenizer's own chat template by
rendering probe conversations and reading off, per role, the text before and after a message's
content, the start of the prompt (BOS, a default system prompt the template adds when none is
given) and the generation prompt. Before writing, the derived pieces are rendered back over the
probes and must reproduce the chat template exactly; a template they cannot reproduce (one that
merges the system prompt into the first user turn, or numbers turns) is refused with a message,
rather than written wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from danlu.errors import UserError

ROLES = ("system", "user", "assistant")
MARK = {"system": "SYSTEM-PROBE-{}", "user": "USER-PROBE-{}", "assistant": "ASSISTANT-PROBE-{}"}


@dataclass
class Pieces:
    """A per-message chat template: start + (pre[role] content suf[role])... + generation prompt."""

    start_with_system: str
    start_without_system: str
    pre: dict[str, str | None]  # None: the template drops that role
    suf: dict[str, str | None]
    generation: str

    def render(self, messages: list[dict[str, str]]) -> str:
        system_first = bool(messages) and messages[0]["role"] == "system"
        out = [self.start_with_system if system_first else self.start_without_system]
        for m in messages:
            if self.pre[m["role"]] is not None:
                out += [self.pre[m["role"]], m["content"], self.suf[m["role"]]]
        return "".join(out) + self.generation


def probe_chats() -> list[list[dict[str, str]]]:
    """Conversations the derived template must reproduce: with and without a system prompt, one
    and several turns."""
    n = iter(range(100))

    def msg(role: str) -> dict[str, str]:
        return {"role": role, "content": MARK[role].format(next(n))}

    return [
        [msg("user")],
        [msg("system"), msg("user")],
        [msg("user"), msg("assistant"), msg("user")],
        [msg("system"), msg("user"), msg("assistant"), msg("user"), msg("assistant"), msg("user")],
    ]


def derive(tokenizer: Any) -> Pieces:
    """The per-message pieces of the tokenizer's chat template, checked on the probes."""

    def render(messages, generation=True) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)

    def between(text: str, a: str, b: str) -> str:
        if a not in text or b not in text:
            raise ValueError("a message's content does not appear in the rendered text as given")
        i, j = text.index(a) + len(a), text.index(b)
        return text[i:j]

    try:
        s, u, a = ({"role": r, "content": MARK[r].format(r)} for r in ROLES)
        user_only = render([u], generation=False)
        generation = render([u])[len(user_only) :]
        suf = {"user": user_only[user_only.index(u["content"]) + len(u["content"]) :]}
        suf["assistant"] = render([u, a], generation=False).split(a["content"])[1]
        convo = render([s, u, a, u | {"content": "USER-PROBE-again"}], generation=False)
        pre = {"user": between(convo, a["content"], "USER-PROBE-again")}
        pre["assistant"] = between(convo, u["content"], a["content"])
        # the suffix/prefix split between two messages is a choice: the suffix is what ends the
        # conversation after that message; what follows it belongs to the next message's prefix
        for role, before in (("user", suf["assistant"]), ("assistant", suf["user"])):
            if not pre[role].startswith(before):
                raise ValueError(f"what ends a turn depends on the next {role} turn")
            pre[role] = pre[role][len(before) :]
        start_without = user_only[: user_only.index(u["content"])]
        if not start_without.endswith(pre["user"]):
            raise ValueError("the first user turn starts unlike the others")
        start_without = start_without[: len(start_without) - len(pre["user"])]
        if s["content"] in convo:
            # a leading system message: its opening is part of the start, its end before the user's
            pre["system"], suf["system"] = "", between(convo, s["content"], u["content"])
            if not suf["system"].endswith(pre["user"]):
                raise ValueError("the system turn ends unlike the others")
            suf["system"] = suf["system"][: len(suf["system"]) - len(pre["user"])]
            start_with = convo[: convo.index(s["content"])]
        else:  # the template drops system messages
            pre["system"] = suf["system"] = None
            start_with = start_without
        pieces = Pieces(start_with, start_without, pre, suf, generation)
    except ValueError as e:
        raise UserError(
            f"the chat template has no per-message shape danlu can write as an Ollama TEMPLATE: {e}"
        ) from e
    except Exception as e:  # the template itself refused a probe (e.g. no system role)
        raise UserError(f"the chat template refused a probe conversation ({type(e).__name__}: {e})") from e
    for chat in probe_chats():
        try:
            want = render(chat)
        except Exception:  # noqa: BLE001 - a template may refuse some shapes (system roles)
            continue
        if pieces.render(chat) != want:
            raise UserError(
                "the chat template does not render messages independently (e.g. it merges the system "
                "prompt into the first user turn); write the Modelfile's TEMPLATE by hand"
            )
    return pieces


def go_literal(text: str) -> str:
    """Text for a Go template: literal, except '{{' which would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(p: Pieces, strip_bos: str = "") -> str:
    """The pieces as a Go text/template over Ollama's .Messages."""
    start_s, start_n = p.start_with_system, p.start_without_system
    if strip_bos:  # Ollama adds BOS itself when the GGUF says add_bos_token
        start_s, start_n = start_s.removeprefix(strip_bos), start_n.removeprefix(strip_bos)
    lit = go_literal
    out = []
    if start_s == start_n:
        out.append(lit(start_s))
    else:
        out.append(
            '{{ if and .Messages (eq (index .Messages 0).Role "system") }}'
            f"{lit(start_s)}{{{{ else }}}}{lit(start_n)}{{{{ end }}}}"
        )
    out.append("{{ range .Messages }}")
    for i, role in enumerate(ROLES):
        keyword = "if" if i == 0 else "else if"
        if p.pre[role] is None:
            out.append(f'{{{{ {keyword} eq .Role "{role}" }}}}')  # dropped, as the chat template does
        else:
            out.append(
                f'{{{{ {keyword} eq .Role "{role}" }}}}{lit(p.pre[role])}{{{{ .Content }}}}{lit(p.suf[role])}'
            )
    out.append("{{ end }}{{ end }}")
    out.append(lit(p.generation))
    return "".join(out)


def modelfile(
    gguf_name: str, tokenizer: Any, stops: list[str], model_dir: Path | None = None, add_bos: bool = False
) -> str:
    """The Modelfile text: FROM, TEMPLATE, stop PARAMETERs, the sampling defaults of generation_config.json."""
    pieces = derive(tokenizer)
    bos = tokenizer.bos_token if add_bos and tokenizer.bos_token else ""
    if bos and not (pieces.start_with_system.startswith(bos) and pieces.start_without_system.startswith(bos)):
        # Ollama tokenizes the rendered TEMPLATE adding BOS as the GGUF says: the chat template
        # must begin with exactly that BOS, once
        raise UserError(
            "the chat template does not start every conversation with BOS while the tokenizer adds one; "
            "write the Modelfile's TEMPLATE by hand"
        )
    template = go_template(pieces, strip_bos=bos)
    if '"""' in template:
        raise UserError('the chat template contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    gen = model_dir / "generation_config.json" if model_dir else None
    if gen and gen.is_file():
        config = json.loads(gen.read_text(encoding="utf-8"))
        for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                          ("repetition_penalty", "repeat_penalty")):  # fmt: skip
            if isinstance(config.get(key), (int, float)) and config.get("do_sample", True):
                lines.append(f"PARAMETER {name} {config[key]}")
    return "\n".join(lines) + "\n"


@dataclass
class OllamaResult:
    gguf: Any  # GgufResult
    modelfile: Path


def export_ollama(
    model_dir: str | Path, out: str | Path, *, qtype: str = "q4_k_m", overwrite: bool = False
) -> OllamaResult:
    """``out`` (a GGUF file) plus ``STEM.Modelfile`` next to it, for ``ollama create NAME -f ...``.

    The Modelfile is derived (and checked) before anything is written, so a chat template Ollama's
    TEMPLATE cannot express leaves no files behind.
    """
    from transformers import AutoTokenizer

    from danlu.export.gguf import export_gguf, read_config
    from danlu.export.gguf_vocab import added_bos_eos, stop_ids
    from danlu.files import atomic_write

    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser().resolve()
    path = out.with_suffix(".Modelfile")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it or choose another --out")
    read_config(model_dir)  # the architecture check first: its message is the useful one
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not tokenizer.chat_template:
        raise UserError(
            f"--model {model_dir}: the tokenizer has no chat template for the Modelfile's TEMPLATE"
        )
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    stops += [tokenizer.convert_ids_to_tokens(i) for i in stop_ids(model_dir, tokenizer)]
    text = modelfile(out.name, tokenizer, stops, model_dir, added_bos_eos(tokenizer)[0])
    result = export_gguf(model_dir, out, qtype=qtype, overwrite=overwrite)
    atomic_write(path, lambda f: f.write(text))
    return OllamaResult(result, path)
