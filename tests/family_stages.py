"""The family matrix's stage runners: one family's tiny model through every stage as a user runs
it, each stage one ``danlu`` command through ``danlu.app.cli.main``, and what each made checked on
its own terms (tests/test_family_matrix.py holds the matrix: the expected cells, the table, the
test per family).

A cell either succeeds (:class:`Outcome` ``ok``), is refused (exit code 2 and one stderr line
``danlu: error: ...``), is skipped (a stage it needs did not succeed) or is wrong (a traceback,
an unclean refusal, a failed check). The GGUF stage reads the file back with transformers' GGUF
reader and, where llama-cpp-python is installed, runs it in llama.cpp.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

import vocab
from conftest import write_jsonl
from danlu.app.cli import main
from vocab import Family

STAGES = ("data", "multi-turn", "LoRA", "packing", "QLoRA", "chat", "merge", "GGUF", "serve")
NEEDS = {"chat": "LoRA", "merge": "LoRA", "serve": "LoRA", "GGUF": "merge"}

RECORDS = [{"instruction": f"Say hello number {i}", "output": f"Hello number {i}!"} for i in range(8)]
MULTI_TURN = [
    {
        "messages": [
            {"role": "user", "content": f"Hi, I am number {i}."},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ]
    }
    for i in range(4)
]
HELLO = [{"role": "user", "content": "Say hello number 3"}]
GREEDY = ("--temperature", "0", "--max-new-tokens", "4", "--repetition-penalty", "1")


# ------------------------------------------------------------------------------ outcomes


@dataclass
class Outcome:
    """One cell: ``ok`` (``text``: a detail for the table), ``refused`` (``text``: the reason),
    ``skipped`` (a stage it needs did not succeed) or ``wrong`` (``text``: what went wrong)."""

    kind: str
    text: str = ""

    def cell(self) -> str:
        if self.kind == "ok":
            return "✓" + (f" ({self.text})" if self.text else "")
        if self.kind == "skipped":
            return f"— (needs {self.text})"
        return f"{'refused' if self.kind == 'refused' else 'WRONG'}: {self.text}"


def reason(message: str, tmp: Path) -> str:
    """A refusal's message without this run's paths, cut at its first clause (before the fix)."""
    text = message.replace(f"{tmp}/", "")
    text = re.sub(r"^--(model|adapter|out) \S+: ", "", text)
    text = re.sub(r"^[\w./-]+\.jsonl:\d+: ", "", text)
    return text.split("; ")[0]


# -------------------------------------------------------------------------------- a run


class Run:
    """One family through every stage, in order; each stage is one ``danlu`` command."""

    def __init__(self, family: Family, model: Path, turn_end: int, tmp: Path, capsys, caplog, monkeypatch):
        self.family, self.model, self.turn_end, self.tmp = family, model, turn_end, tmp
        self.capsys, self.caplog, self.monkeypatch = capsys, caplog, monkeypatch
        self.data = write_jsonl(tmp / "single.jsonl", RECORDS)
        self.multi = write_jsonl(tmp / "multi.jsonl", MULTI_TURN)
        self.config = tmp / "run.yaml"
        template = f"  template: {family.named_template}\n" if family.named_template else ""
        self.config.write_text(
            f"model:\n  path: {model}\n"
            f"data:\n  path: {self.data}\n  cache: false\n  max_seq_length: 128\n{template}"
            "lora:\n  r: 4\n  alpha: 8\n  dropout: 0\n"
            "train:\n  batch_size: 4\n  max_steps: 2\n  lr: 1e-2\n  scheduler: constant\n"
            "output:\n  tensorboard: false\n",
            encoding="utf-8",
        )
        self.outcomes: dict[str, Outcome] = {}
        self.engines: list = []
        self.record_engines()

    def all(self) -> dict[str, Outcome]:
        for name, check in (
            ("data", lambda: self.check_data(self.data)),
            ("multi-turn", lambda: self.check_data(self.multi)),
            ("LoRA", lambda: self.train("lora")),
            ("packing", lambda: self.train("packed", "data.packing=true")),
            ("QLoRA", lambda: self.train("qlora", "model.quantization=nf4")),
            ("chat", self.chat),
            ("merge", self.merge),
            ("GGUF", self.gguf),
            ("serve", self.serve),
        ):
            need = NEEDS.get(name)
            if need and self.outcomes[need].kind != "ok":
                self.outcomes[name] = Outcome("skipped", need)
                continue
            try:
                self.outcomes[name] = check()
            except AssertionError as e:  # the command succeeded, but what it made is wrong
                self.outcomes[name] = Outcome("wrong", str(e).split("\n")[0][:300])
        return self.outcomes

    def danlu(self, *argv: object) -> tuple[Outcome, str]:
        """Run one command: its outcome (0: ok; 2 and one ``danlu: error:`` line: refused; anything
        else, a traceback included, is wrong) and its stdout."""
        self.capsys.readouterr()
        self.caplog.clear()
        try:
            code = main([str(a) for a in argv])
        except Exception as e:  # noqa: BLE001 - what a user would see as a traceback
            self.capsys.readouterr()
            return Outcome("wrong", f"traceback: {type(e).__name__}: {' '.join(str(e).split())[:300]}"), ""
        out, err = self.capsys.readouterr()
        lines = err.strip().splitlines()
        if "Traceback" in err:
            return Outcome("wrong", f"exit {code} with a traceback: {err.strip()[-300:]}"), out
        if code == 0:
            return Outcome("ok"), out
        if code == 2 and len(lines) == 1 and lines[0].startswith("danlu: error: "):
            return Outcome("refused", reason(lines[0].removeprefix("danlu: error: "), self.tmp)), out
        return Outcome("wrong", f"exit {code}, stderr {err.strip()[-300:]!r}"), out

    # ------------------------------------------------------------------------------ stages

    def check_data(self, path: Path) -> Outcome:
        template = ["--template", self.family.named_template] if self.family.named_template else []
        outcome, out = self.danlu("data", "check", path, "--model", self.model, *template)
        if outcome.kind == "ok":
            assert re.search(r"truncated:\s+0 of", out) and re.search(r"problems:\s+none", out), out[-300:]
        return outcome

    def train(self, name: str, *overrides: str) -> Outcome:
        self.caplog.set_level(logging.INFO, logger="danlu")
        run = self.tmp / name
        outcome, _ = self.danlu("train", self.config, f"output.dir={run}", *overrides, "--no-progress")
        if outcome.kind != "ok":
            return outcome
        log = self.caplog.text
        losses = [float(x) for x in re.findall(r"final loss (\S+?)\)", log)]
        assert losses and math.isfinite(losses[-1]), f"no finite final loss in the log: {log[-300:]}"
        assert (run / "final" / "adapter_config.json").is_file(), "no adapter written"
        if name == "lora":
            self.adapter = run / "final"
        fast = re.search(r"fast path: (.*)", log)
        if "its loss differs" in log or not fast or not fast.group(1).startswith(("padding-free", "chunked")):
            return Outcome("ok", "plain loss")
        return Outcome("ok", "padding-free" if fast.group(1).startswith("padding-free") else "chunked loss")

    def record_engines(self) -> None:
        """Keep each Engine a verb builds (wherever it imports the class from), to check its stops."""
        from danlu.infer import Engine

        engines, init = self.engines, Engine.__init__

        def recording(engine, *args, **kwargs) -> None:
            init(engine, *args, **kwargs)
            engines.append(engine)

        self.monkeypatch.setattr(Engine, "__init__", recording)

    def stops_on_turn_end(self, verb: str) -> None:
        stops = self.engines[-1].stop_ids
        assert self.turn_end in stops, (
            f"{verb} does not stop on {self.family.turn_end} ({self.turn_end}): {stops}"
        )

    def chat(self) -> Outcome:
        self.monkeypatch.setattr("sys.stdin", io.StringIO("Say hello number 3\n/exit\n"))
        outcome, out = self.danlu("chat", "--adapter", self.adapter, *GREEDY)
        if outcome.kind == "ok":
            assert "assistant> " in out, out[-300:]
            self.stops_on_turn_end("chat")
        return outcome

    def merge(self) -> Outcome:
        self.merged = self.tmp / "merged"
        outcome, _ = self.danlu("merge", "--adapter", self.adapter, "--out", self.merged)
        if outcome.kind != "ok":
            return outcome
        eos = json.loads((self.merged / "generation_config.json").read_text())["eos_token_id"]
        eos = eos if isinstance(eos, list) else [eos]
        assert self.turn_end in eos, f"the merged generation_config's eos {eos} lacks {self.family.turn_end}"
        assert chat_template(self.merged) == chat_template(self.adapter), "the merge lost the run's template"
        return outcome

    def gguf(self) -> Outcome:
        path = self.tmp / "gguf" / "merged.gguf"
        outcome, _ = self.danlu("export", "gguf", "--model", self.merged, "--out", path)
        if outcome.kind != "ok":
            return outcome
        meta, model = read_gguf(path, self.merged)
        assert meta.get("tokenizer.chat_template") == chat_template(self.merged), (
            "the GGUF's chat template differs"
        )
        llm = llama_cpp_model(path)  # llama.cpp itself where it is installed (make install builds it)
        if self.family.vocab:  # the vocabulary as llama.cpp's own file for the family has it
            name = self.family.vocab
            source, _ = read_gguf_metadata(vocab.VOCAB_DIR / f"ggml-vocab-{name}.gguf")
            for key in ("model", "bos_token_id", "eos_token_id", "tokens"):
                mine, theirs = meta.get(f"tokenizer.ggml.{key}"), source.get(f"tokenizer.ggml.{key}")
                shown = (mine, theirs) if key != "tokens" else ("a different list", "another")
                assert mine == theirs, (
                    f"the GGUF's tokenizer.ggml.{key} is {shown[0]!r}, llama.cpp's file has {shown[1]!r}"
                )
            if llm is not None:
                encode = lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)  # noqa: E731
            else:  # what transformers' GGUF reader makes of the written vocabulary
                tokenizer = vocab.convert(path, name)
                encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
            wrong = [text for text, ids in vocab.vectors(name) if encode(text) != ids]
            assert not wrong, (
                f"the GGUF's vocabulary encodes {len(wrong)} of llama.cpp's test vectors differently"
            )
        ids = (torch.arange(3, 40) * 7).tolist()  # any tokens: the two models must agree on all
        with torch.no_grad():
            from transformers import AutoModelForCausalLM

            want = AutoModelForCausalLM.from_pretrained(self.merged).eval()(torch.tensor([ids])).logits[0]
            got = model(torch.tensor([ids])).logits[0] if llm is None else llama_cpp_logits(llm, ids)
        # f16 weights: measured 0.3-0.8% of the largest logit, in llama.cpp and in transformers alike
        diff = (got - want).abs().max().item() / want.abs().max().item()
        reader = "transformers' GGUF reader" if llm is None else "llama.cpp"
        assert diff < 3e-2, f"in {reader}, the GGUF's logits differ from the merged model's by {diff:.2%}"
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9, (
            f"in {reader}, other tokens come first"
        )
        return outcome

    def serve(self) -> Outcome:
        import uvicorn
        from starlette.testclient import TestClient

        replies: list = []

        def one_request(app, **kwargs) -> None:  # uvicorn.run, answering one request instead of serving
            with TestClient(app) as client:
                body = {"model": "tuned", "messages": HELLO, "max_tokens": 4, "temperature": 0}
                replies.append(client.post("/v1/chat/completions", json=body))

        self.monkeypatch.setattr(uvicorn, "run", one_request)
        outcome, _ = self.danlu("serve", "--adapter", f"tuned={self.adapter}", "--port", free_port(), *GREEDY)
        if outcome.kind == "ok":
            assert replies and replies[0].status_code == 200, (
                replies[0].text if replies else "no request made"
            )
            choice = replies[0].json()["choices"][0]
            assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in (
                "stop",
                "length",
            )
            self.stops_on_turn_end("serve")
        return outcome


def chat_template(folder: Path) -> str | None:
    """The chat template a saved tokenizer carries (read from its files, not loaded)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- reading a GGUF


def llama_cpp_model(path: Path):
    """The GGUF in llama.cpp (llama-cpp-python; f32 KV cache), or None where it is not installed:
    one load for both its vocabulary and its logits."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=128, logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False
    )


def llama_cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    """The logits llama.cpp computes from the GGUF for ``ids``."""
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)


def read_gguf_metadata(path: Path) -> tuple[dict, tuple[str, ...]]:
    """A GGUF's metadata (token list included) and tensor names, with transformers' fast reader."""
    from transformers.integrations.gguf.reader import read_gguf_metadata as read

    return read(str(path), ("tokenizer.ggml.tokens",))


# GGUF metadata key (after the architecture's prefix) → config.json key, checked equal
GGUF_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "vocab_size": "vocab_size",
}


def read_gguf(path: Path, merged: Path) -> tuple[dict, torch.nn.Module]:
    """A GGUF's metadata and the model its tensors make, read as transformers' GGUF loader reads
    them (its tensor processors undo llama.cpp's q/k permutation), with transformers' fast reader
    (the loader itself parses a 150k-token vocabulary with gguf-py for about 40 s). The model's
    shape comes from the merged folder, and the metadata llama.cpp builds the model from is
    checked against it; llama-3 rope's frequency factors against transformers' own."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    meta, _ = read_gguf_metadata(path)
    config = AutoConfig.from_pretrained(merged)
    arch = meta["general.architecture"]
    for key, name in GGUF_CONFIG_KEYS.items():
        if f"{arch}.{key}" in meta and getattr(config, name, None) is not None:
            assert meta[f"{arch}.{key}"] == getattr(config, name), f"GGUF {arch}.{key} is not {name}"
    model = AutoModelForCausalLM.from_config(config).eval()
    heads = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "n_head": config.num_attention_heads,  # BLOOM's processor regroups the fused qkv per head
        "hidden_size": config.hidden_size,
    }
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=heads)
    names = get_gguf_hf_weights_map(model, processor, model_type=arch)
    state = {}
    for gguf_name, lazy in load_gguf_state_dict(GgufHeader.from_file(str(path))).items():
        weights = lazy[...].float().numpy()
        if gguf_name == "rope_freqs.weight":
            assert torch.allclose(torch.from_numpy(weights), llama3_rope_factors(config), rtol=1e-3), (
                "rope_freqs"
            )
            continue
        result = processor.process(
            weights=weights, name=gguf_name, tensor_key_mapping=names, parsed_parameters={}
        )
        assert result.name in names, f"GGUF tensor {gguf_name} is no parameter of {type(model).__name__}"
        state[names[result.name]] = torch.from_numpy(result.weights.copy())
    missing, _ = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(missing) <= tied, f"the GGUF lacks {sorted(missing)[:4]}"
    if tied:
        model.tie_weights()
    return meta, model


def llama3_rope_factors(config) -> torch.Tensor:
    """What llama.cpp divides each rotary frequency by: transformers' plain frequencies over its
    llama-3 scaled ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return plain / scaled
