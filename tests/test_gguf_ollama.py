"""A GGUF chats as its model does: generation through the file's own chat template stops at the end
of the turn, and `danlu export ollama` writes a Modelfile whose TEMPLATE (rendered here with Go's
text/template semantics) makes the prompts the chat template makes. Builders: tests/gguf_helpers.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from danlu.app.cli import main
from danlu.export import export_gguf
from gguf_helpers import (
    CHAT,
    LLAMA2_TEMPLATE,
    bigram_model,
    build,
    load,
)

pytest_plugins = ["gguf_helpers"]  # its fixtures: family_dirs, real_tokenizer


# ------------------------------------------------------------------------------ chat


def test_generation_through_the_files_own_chat_template_stops_at_the_end_of_turn(tokenizer, tmp_path):
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    reply = tokenizer("丹炉 says hi!", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    src = bigram_model(tmp_path / "src", tokenizer, [prompt[-1], *reply, end, *reply])  # after the end: more
    path = export_gguf(src, tmp_path / "m.gguf", qtype="f16").path
    llm = load(path)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    out = llm.create_chat_completion(CHAT, max_tokens=30, temperature=0.0)["choices"][0]
    assert out["message"]["content"] == "丹炉 says hi!"
    assert out["finish_reason"] == "stop"
    # the same reply from transformers, and it is the template that made the prompt
    assert llm.tokenize(llm.detokenize(prompt, special=True), add_bos=False, special=True) == list(prompt)
    hf = AutoModelForCausalLM.from_pretrained(src).generate(
        torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=end
    )
    assert hf[0, len(prompt) :].tolist() == [*reply, end]


# ---------------------------------------------------------------------------- Ollama


def render_go(template: str, data: dict) -> str:
    """Go text/template semantics for what a Modelfile TEMPLATE uses: text, {{ .Field }},
    if / else if / else / end, range / end, parentheses, string literals, and the functions
    eq, ne, and, or, not, index, len (and/or short-circuit as in Go 1.18+); {{- -}} trimming."""
    import re

    parts = re.split(r"(\{\{-?\s.*?\s-?\}\}|\{\{[^ ].*?\}\})", template, flags=re.S)
    tokens: list[tuple[str, str]] = []
    for part in parts:
        if part.startswith("{{"):
            body = part[2:-2]
            if body.startswith("-") and tokens and tokens[-1][0] == "text":
                tokens[-1] = ("text", tokens[-1][1].rstrip())
            tokens.append(("act", body.strip("-").strip()))
            if body.endswith("-"):
                tokens.append(("trim", ""))
        elif tokens and tokens[-1][0] == "trim":
            tokens[-1] = ("text", part.lstrip())
        else:
            tokens.append(("text", part))

    def parse(i: int, stop: tuple[str, ...]):
        nodes = []
        while i < len(tokens):
            kind, body = tokens[i]
            word = body.split(" ", 1)[0] if kind == "act" else ""
            if kind == "act" and word in stop:
                return nodes, i
            if kind == "act" and word == "if":
                branches, cond = [], body[3:]
                while True:
                    inner, i = parse(i + 1, ("else", "end"))
                    branches.append((cond, inner))
                    kind, body = tokens[i]
                    if body == "end":
                        break
                    cond = body[len("else if ") :] if body.startswith("else if ") else "true"
                nodes.append(("if", branches))
            elif kind == "act" and word == "range":
                inner, i = parse(i + 1, ("end",))
                nodes.append(("range", body[6:], inner))
            else:
                nodes.append((kind, body))
            i += 1
        return nodes, i

    def lex(expr: str) -> list[str]:
        return re.findall(r'"(?:[^"\\]|\\.)*"|\(|\)|\.[A-Za-z_.]*|[^\s()]+', expr)

    def operand(toks: list[str], dot):
        t = toks.pop(0)
        if t == "(":
            depth, inner = 1, []
            while True:
                u = toks.pop(0)
                depth += {"(": 1, ")": -1}.get(u, 0)
                if depth == 0:
                    break
                inner.append(u)
            value = call(inner, dot)
            while toks and toks[0].startswith(".") and toks[0] != ".":
                for field in toks.pop(0).strip(".").split("."):
                    value = value[field]
            return value
        if t.startswith('"'):
            return json.loads(t)
        if t == "true":
            return True
        if t.isdigit():
            return int(t)
        if t.startswith("."):
            value = dot
            for field in filter(None, t.split(".")):
                value = value[field]
            return value
        raise ValueError(t)

    def call(toks: list[str], dot):
        toks = list(toks)
        fn = toks[0]
        if fn in ("and", "or"):
            toks.pop(0)
            value = None
            while toks:
                value = operand(toks, dot)
                if (fn == "and" and not value) or (fn == "or" and value):
                    return value
            return value
        funcs = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not a,
                 "index": lambda a, i: a[i], "len": len}  # fmt: skip
        if fn in funcs:
            toks.pop(0)
            args = []
            while toks:
                args.append(operand(toks, dot))
            return funcs[fn](*args)
        return operand(toks, dot)

    def run(nodes, dot) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "act":
                out.append(str(call(lex(node[1]), dot)))
            elif node[0] == "if":
                for cond, inner in node[1]:
                    if call(lex(cond), dot):
                        out.append(run(inner, dot))
                        break
            elif node[0] == "range":
                for item in call(lex(node[1]), dot):
                    out.append(run(node[2], item))
        return "".join(out)

    return run(parse(0, ())[0], data)


def test_the_go_renderer_follows_go_semantics():
    t = '{{- if and .Messages (eq (index .Messages 0).Role "system") }}S{{ else }}N{{ end -}}\n  {{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}'
    assert render_go(t, {"Messages": []}) == "N"  # `and` stops before index fails
    assert render_go(t, {"Messages": [{"Role": "system", "Content": "x"}]}) == "S[system:x]"
    assert (
        render_go('{{ if eq .A "b" }}1{{ else if not .C }}2{{ else }}3{{ end }}', {"A": "z", "C": ""}) == "2"
    )


OLLAMA_CHATS = [
    [{"role": "user", "content": "你好"}],
    CHAT,
    [*CHAT, {"role": "assistant", "content": "LoRA 是低秩适配。\nLoRA adds low-rank updates."},
     {"role": "user", "content": "Thanks! {{ not a template }}"}],
]  # fmt: skip


def ollama_render(modelfile: str, chat: list[dict]) -> str:
    import re

    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, flags=re.S | re.M).group(1)
    return render_go(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in chat]})


@pytest.mark.parametrize("name", ["smollm2", "llama-bpe", "llama-spm", "qwen2", "phi-3"])
def test_ollama_template_renders_conversations_as_the_chat_template_does(name, tokenizer, real_tokenizer):
    from danlu.export.ollama import modelfile

    tok = tokenizer if name == "smollm2" else real_tokenizer(name)
    bos = tok("a")["input_ids"][0] == tok.bos_token_id
    text = modelfile("m.gguf", tok, [tok.eos_token], add_bos=bos)
    for chat in OLLAMA_CHATS:
        want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        if bos:  # Ollama adds BOS itself, as the GGUF says
            want = want.removeprefix(tok.bos_token)
        assert ollama_render(text, chat) == want
    assert text.startswith("FROM ./m.gguf\n") and f"PARAMETER stop {json.dumps(tok.eos_token)}" in text


def test_a_chat_template_ollama_cannot_express_is_refused_before_anything_is_written(
    real_tokenizer, tmp_path
):
    tok = real_tokenizer("llama-spm")
    tok.chat_template = LLAMA2_TEMPLATE  # its system prompt goes inside the first user turn
    src = build(tmp_path / "src", tok, "llama", hidden_size=32, intermediate_size=64)
    out = tmp_path / "ship" / "m.gguf"
    assert main(["export", "ollama", "--model", str(src), "--out", str(out)]) == 2
    assert not (tmp_path / "ship").exists() or not list((tmp_path / "ship").iterdir())


def test_export_ollama_writes_gguf_and_modelfile_that_stop(tokenizer, tmp_path, capsys):
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    reply = tokenizer("丹炉 says hi!", add_special_tokens=False)["input_ids"]
    src = bigram_model(tmp_path / "src", tokenizer, [prompt[-1], *reply, tokenizer.eos_token_id, *reply])
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "temperature": 0.6}))
    out = tmp_path / "ship" / "tuned.gguf"
    assert main(["export", "ollama", "--model", str(src), "--out", str(out), "--type", "q8_0"]) == 0
    assert "ollama create" in capsys.readouterr().out
    modelfile = (tmp_path / "ship" / "tuned.Modelfile").read_text()
    assert modelfile.startswith("FROM ./tuned.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert "PARAMETER temperature 0.6" in modelfile
    # what Ollama would send llama.cpp: the TEMPLATE's rendering, tokenized with the GGUF's add_bos
    llm = load(out)
    ids = llm.tokenize(ollama_render(modelfile, CHAT).encode(), special=True)
    assert ids == list(prompt)
    out = llm.create_completion(ids, max_tokens=30, temperature=0.0)["choices"][0]
    assert out["text"] == "丹炉 says hi!" and out["finish_reason"] == "stop"
