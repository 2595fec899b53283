"""What trains, and with which optimizer: LoRA (DoRA, rsLoRA), full fine-tuning, freeze tuning.

LoRA goes through peft; full and freeze tuning mark the base model's own parameters
trainable (freeze: only the last ``train.freeze_layers`` decoder layers, optionally only the
parameters whose names contain one of ``train.freeze_modules``). Optimizers come from torch
or, for 8-bit and paged variants, bitsandbytes.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from danlu import model as mdl
from danlu.config import Config
from danlu.errors import UserError


def prepare(base: Any, cfg: Config, dtype: torch.dtype, quantized: bool) -> Any:
    """The loaded base made ready to train: k-bit preparation, checkpointing, the trainable part."""
    checkpointing = {"use_reentrant": False}
    if quantized:  # QLoRA: norms in fp32, input grads on, checkpointing as configured
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base, cfg.train.gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
        # peft upcasts every unquantized weight (embeddings, head, norms) to fp32. Back to the compute
        # dtype: the embedding and head are 2 x vocab x hidden, and fp32 norm outputs would make
        # bitsandbytes return fp32 and carry the whole residual stream in fp32 (measured: +1 GiB on 8B).
        for p in base.parameters():
            if p.dtype == torch.float32 and dtype != torch.float32:
                p.data = p.data.to(dtype)
    elif cfg.train.gradient_checkpointing:
        mdl.enable_checkpointing(base, checkpointing)
    model = make_trainable(base, cfg)
    model.train()  # from_pretrained returns eval mode: no dropout, and checkpointing would not act
    return model


def make_trainable(base: Any, cfg: Config) -> Any:
    """Return the model to train, with exactly the parameters ``cfg.train.method`` asks for trainable."""
    t, lora = cfg.train, cfg.lora
    if t.method == "lora":
        return mdl.add_lora(
            base,
            lora.r,
            lora.alpha,
            lora.dropout,
            lora.target_modules,
            t.seed,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
        )
    if t.method == "full":
        base.requires_grad_(True)
        return base
    base.requires_grad_(False)
    layers = mdl.decoder_layers(base)
    if layers is None:
        raise UserError("train.method=freeze: cannot find this model's decoder layers; use lora or full")
    if t.freeze_layers > len(layers):
        raise UserError(f"train.freeze_layers={t.freeze_layers}, but the model has {len(layers)} layers")
    chosen = 0
    for layer in list(layers)[-t.freeze_layers :]:
        for name, p in layer.named_parameters():
            if not t.freeze_modules or any(m in name for m in t.freeze_modules):
                p.requires_grad_(True)
                chosen += 1
    if not chosen:
        raise UserError(f"train.freeze_modules {t.freeze_modules} match no parameter of the last layers")
    return base


def make_optimizer(params: list[torch.nn.Parameter], cfg: Config, device: str) -> torch.optim.Optimizer:
    """The optimizer ``cfg.train.optimizer`` names, over ``params``."""
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=device == "cuda")
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"train.optimizer={t.optimizer} needs bitsandbytes: pip install bitsandbytes")
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }[t.optimizer]
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)
