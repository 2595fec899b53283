"""Training methods (LoRA variants, full, freeze), optimizers, sample generations, loggers."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import write_jsonl
from danlu import tracking
from danlu.config import load_config
from danlu.errors import UserError
from danlu.train import train

RECORDS = [
    {"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}, says Danlu."} for i in range(6)
]


def cfg(tiny_model_dir, tmp_path, *extra, name="run"):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    return load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.path={data}",
            "data.cache=false",
            f"output.dir={tmp_path / name}",
            "output.tensorboard=false",
            "lora.r=4",
            "lora.alpha=8",
            "lora.dropout=0",
            "train.batch_size=6",
            "train.scheduler=constant",
            *extra,
        ],
    )


def changed(before: dict, after: AutoModelForCausalLM) -> set[str]:
    now = dict(after.named_parameters())
    return {n for n, p in before.items() if not torch.equal(p, now[n].detach())}


def test_full_fine_tuning_changes_every_weight_and_saves_a_model(tiny_model_dir, tmp_path):
    result = train(
        cfg(tiny_model_dir, tmp_path, "train.method=full", "train.max_steps=4", "train.lr=1e-3"),
        progress=False,
    )
    assert result.losses[-1] < result.losses[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    tuned = AutoModelForCausalLM.from_pretrained(result.adapter_dir)  # a whole model, plain transformers
    assert changed(before, tuned) == set(before)
    assert not (result.adapter_dir / "adapter_config.json").exists()


@pytest.mark.parametrize(("modules", "expect"), [([], "layers.1."), (["mlp"], "layers.1.mlp.")])
def test_freeze_trains_only_the_last_layers(tiny_model_dir, tmp_path, modules, expect):
    extra = ["train.method=freeze", "train.freeze_layers=1", "train.max_steps=3", "train.lr=1e-2"]
    if modules:
        extra.append(f"train.freeze_modules=[{','.join(modules)}]")
    result = train(cfg(tiny_model_dir, tmp_path, *extra), progress=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    moved = changed(before, AutoModelForCausalLM.from_pretrained(result.adapter_dir))
    assert moved and all(expect in n for n in moved)
    trainable = [n for n in before if expect in n and (not modules or "mlp" in n)]
    assert moved == set(trainable)


def test_freeze_tuning_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    extra = (
        "train.method=freeze",
        "train.freeze_layers=1",
        "train.max_steps=6",
        "train.lr=1e-2",
        "train.batch_size=2",
        "train.save_every=2",
    )
    straight = train(cfg(tiny_model_dir, tmp_path, *extra, name="a"), progress=False)
    real_log = tracking.Tracker.log

    def crash_at_5(self, step, **metrics):
        if step == 5:
            raise KeyboardInterrupt  # dies after checkpoint-4, before step 5 is recorded
        real_log(self, step, **metrics)

    monkeypatch.setattr(tracking.Tracker, "log", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tiny_model_dir, tmp_path, *extra, name="b"), progress=False)
    monkeypatch.setattr(tracking.Tracker, "log", real_log)
    resumed = train(cfg(tiny_model_dir, tmp_path, *extra, name="b"), resume=True, progress=False)
    assert resumed.losses == pytest.approx(straight.losses[4:], abs=1e-5)
    a = load_file(straight.adapter_dir / "model.safetensors")
    b = load_file(resumed.adapter_dir / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)


def test_dora_trains_a_magnitude_vector_for_every_targeted_layer(tiny_model_dir, tmp_path):
    result = train(cfg(tiny_model_dir, tmp_path, "lora.use_dora=true", "train.max_steps=3"), progress=False)
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in saved.items() if k.endswith("lora_magnitude_vector")}
    lora_a = [k for k in saved if k.endswith("lora_A.weight")]
    assert magnitudes and len(magnitudes) == len(lora_a)  # one per adapted layer
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    for key, magnitude in magnitudes.items():
        weight = base[key.replace("base_model.model.", "").replace("lora_magnitude_vector", "weight")]
        assert magnitude.shape == (weight.shape[0],)
        # DoRA starts from the base's row norms and learns them: they moved
        assert not torch.allclose(magnitude, weight.detach().norm(dim=1), atol=1e-4)


def test_rslora_scales_the_update_by_alpha_over_sqrt_r(tiny_model_dir, tmp_path):
    from peft import PeftModel

    steps = ("train.max_steps=4", "train.lr=5e-2")
    plain = train(cfg(tiny_model_dir, tmp_path, *steps, name="plain"), progress=False)
    rs = train(cfg(tiny_model_dir, tmp_path, "lora.use_rslora=true", *steps, name="rs"), progress=False)
    assert rs.losses[0] == pytest.approx(plain.losses[0], abs=1e-6)  # B starts at 0: the same first step
    assert abs(rs.losses[-1] - plain.losses[-1]) > 1e-3  # then a twice larger update (8/sqrt(4) vs 8/4)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), rs.adapter_dir)
    scales = [m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert scales and scales == pytest.approx([8 / 4**0.5] * len(scales))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_sample_chats_leave_a_qlora_run_unchanged(wide_model_dir, tmp_path):
    """A sample chat runs the 4-bit model in inference; on CPUs with AVX512-BF16 bitsandbytes then
    repacks the weights for its inference kernel, and training went on differently (measured)."""
    steps = ("model.quantization=nf4", "train.max_steps=6", "train.lr=5e-2")
    quiet = train(cfg(wide_model_dir, tmp_path, *steps, name="quiet"), progress=False)
    chatty = train(
        cfg(
            wide_model_dir,
            tmp_path,
            *steps,
            'train.eval_prompts=["hi"]',
            "train.sample_every=2",
            name="chatty",
        ),
        progress=False,
    )
    assert chatty.losses == pytest.approx(quiet.losses, abs=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"])
def test_other_optimizers_train(tiny_model_dir, tmp_path, optimizer):
    if optimizer != "sgd":
        pytest.importorskip("bitsandbytes")
    result = train(
        cfg(tiny_model_dir, tmp_path, f"train.optimizer={optimizer}", "train.max_steps=8", "train.lr=5e-2"),
        progress=False,
    )
    assert result.losses[-1] < result.losses[0]


def test_eval_prompts_record_base_answers_then_tuned_answers(tiny_model_dir, tmp_path):
    result = train(
        cfg(
            tiny_model_dir,
            tmp_path,
            "train.max_steps=4",
            "train.sample_every=2",
            'train.eval_prompts=["Who are you?", "你是谁？"]',
        ),
        progress=False,
    )
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in rows if "samples" in r]
    assert [r["step"] for r in samples] == [0, 2, 4]
    assert [s["prompt"] for s in samples[0]["samples"]] == ["Who are you?", "你是谁？"]
    # step 0 is the base model's greedy answer, the last one the saved adapter's
    from danlu.infer import Engine, GenerationSettings

    greedy = GenerationSettings(max_new_tokens=64, temperature=0, repetition_penalty=1.0)
    tuned = Engine(str(tiny_model_dir), result.adapter_dir, precision="fp32")
    for row, use_adapter in ((samples[0], False), (samples[-1], True)):
        for s in row["samples"]:
            expected = tuned.reply([{"role": "user", "content": s["prompt"]}], greedy, use_adapter)
            assert s["answer"] == expected
    assert samples[0]["samples"] != samples[-1]["samples"]  # training changed the answers


def test_sample_answers_render_prompts_with_the_runs_template_kwargs(tiny_model_dir):
    from transformers import AutoTokenizer

    from danlu.recipe import sample_answers

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (  # a reasoning template: thinking off closes an empty think block
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    )
    seen: list[str] = []
    real = tok.apply_chat_template
    tok.apply_chat_template = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stop = [tok.eos_token_id]
    sample_answers(
        model, tok, ["hi"], stop, "cpu", template_kwargs={"enable_thinking": False}, max_new_tokens=1
    )
    sample_answers(model, tok, ["hi"], stop, "cpu", max_new_tokens=1)
    assert seen == ["<|user|>hi<|assistant|><think></think>", "<|user|>hi<|assistant|>"]


def test_quantization_needs_lora_and_unknown_loggers_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="needs train.method=lora"):
        cfg(tiny_model_dir, tmp_path, "train.method=full", "model.quantization=nf4")
    with pytest.raises(UserError, match="report_to"):
        cfg(tiny_model_dir, tmp_path, "output.report_to=[tensorboardx]")
    with pytest.raises(UserError, match="pip install wandb"):
        train(cfg(tiny_model_dir, tmp_path, "output.report_to=[wandb]"), progress=False)


def test_cuda_out_of_memory_stops_with_the_planners_advice(tiny_model_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import danlu.fast.loss as fast_loss
    import danlu.train as train_mod
    from danlu.plan import GiB

    def boom(model, batch, *options):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, "forward", boom)  # the plain path
    monkeypatch.setattr(fast_loss, "loss_sum", boom)  # the fast path (the default): Objective's forward
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=1 * GiB))
    with pytest.raises(UserError) as caught:
        train(cfg(tiny_model_dir, tmp_path, "train.max_steps=2", "train.batch_size=4"), progress=False)
    message = str(caught.value)
    assert message.startswith("CUDA out of memory (danlu plan estimates") and "the GPU has 1.0 GiB" in message
    assert "try: " in message and "\n" not in message


def test_nan_loss_stops_the_run_naming_the_last_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import danlu.fast.loss as fast_loss
    import danlu.train as train_mod

    calls = {"n": 0}

    def nan_from_step_4(real):
        def loss(*args):
            calls["n"] += 1
            value = real(*args)
            return value * float("nan") if calls["n"] >= 4 else value

        return loss

    # whichever loss the run uses: the fast path's (the default) or the plain one; the fast path's
    # check against the plain loss before step 1 is left out of the count
    monkeypatch.setattr(train_mod, "fast_loss_agrees", lambda *a: True)
    monkeypatch.setattr(train_mod, "token_loss_sum", nan_from_step_4(train_mod.token_loss_sum))
    monkeypatch.setattr(fast_loss, "loss_sum", nan_from_step_4(fast_loss.loss_sum))
    with pytest.raises(UserError, match=r"loss became nan at step 4.*checkpoint-2, continue with --resume"):
        train(cfg(tiny_model_dir, tmp_path, "train.max_steps=6", "train.save_every=2"), progress=False)
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "final").exists()


def test_warmup_ratio_and_the_loss_curve_png(tiny_model_dir, tmp_path):
    result = train(
        cfg(
            tiny_model_dir,
            tmp_path,
            "train.max_steps=10",
            "train.warmup_ratio=0.3",
            "train.lr=1e-3",
            "train.scheduler=linear",
        ),
        progress=False,
    )
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[:4] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])  # 3 warmup steps, then linear decay
    assert (result.output_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_answer_to_which_modules_are_the_decoder_layers(tiny_model_dir):
    """model.decoder_layers serves freezing and FSDP2 alike: through peft, for a model whose
    decoder has no ``layers`` (BLOOM's ``transformer.h``), and None where there is none."""
    from peft import LoraConfig, get_peft_model
    from transformers import BloomConfig, BloomForCausalLM

    from danlu.model import decoder_layers

    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert decoder_layers(llama) is llama.model.layers
    wrapped = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layers(wrapped) is llama.model.layers
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=3, n_head=2))
    assert decoder_layers(bloom) is bloom.transformer.h
    assert decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


@pytest.mark.parametrize("checkpointing", [True, False])
def test_prepare_turns_checkpointing_on_every_layer_as_configured(tiny_model_dir, tmp_path, checkpointing):
    import warnings

    from danlu import model as mdl
    from danlu.methods import prepare

    c = cfg(tiny_model_dir, tmp_path, f"train.gradient_checkpointing={str(checkpointing).lower()}")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = prepare(base, c, torch.float32, quantized=False)
    flags = [layer.gradient_checkpointing for layer in mdl.decoder_layers(model.get_base_model())]
    assert flags and set(flags) == {checkpointing}
    # not through transformers' deprecated alias (to go in v6)
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]
