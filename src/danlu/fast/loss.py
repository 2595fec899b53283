"""A next-token loss that never holds the logits of the whole batch.

The plain path turns the last hidden states into batch × length × vocabulary logits (bf16), then
an fp32 copy for the loss, and autograd keeps both for the backward: on Llama-3-8B (vocabulary
128,256) at 2 × 2048 tokens that is about 7 GiB, more than the 4-bit weights. Here the decoder's
hidden states go to the loss instead, and only the positions that are trained (assistant tokens)
are projected onto the vocabulary, a chunk of :data:`CHUNK` tokens at a time, and each chunk's
gradient is computed right there (softmax minus one-hot: on CUDA one compiled step over the
chunk's bf16 logits, elsewhere in the fp32 logits' own memory), so at most one chunk's logits
exist at any moment and the head's matmul is never recomputed. The result is
the same summed cross-entropy as the plain path, to float rounding.

Where :mod:`danlu.fast.decoder` supports the architecture (and ``Options.varlen``), the hidden
states come from a padding-free run of the decoder; otherwise from transformers' own decoder.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from danlu.data.render import IGNORE
from danlu.fast import ALL, CHUNK, Options, decoder, kernels, pairs, varlen


def supports(model: Any) -> bool:
    """Whether ``model`` (a causal LM, or peft around one) exposes its decoder and output layer."""
    lm = _causal_lm(model)
    return (
        hasattr(lm, "get_decoder")
        and lm.get_decoder() is not None
        and isinstance(lm.get_output_embeddings(), torch.nn.Linear)
        and getattr(lm.get_output_embeddings(), "bias", None) is None
        and getattr(lm.config, "final_logit_softcapping", None) is None
        and getattr(lm.config, "logit_scale", None) is None
    )


def describe(model: Any, options: Options = ALL) -> str:
    """What :func:`loss_sum` will run for ``model``, for the training log."""
    if not supports(model):
        return "not available for this model (plain loss)"
    lm = _causal_lm(model)
    if options.varlen and decoder.supports(lm):
        device = lm.get_output_embeddings().weight.device
        parts = ["padding-free decoder, variable-length attention"]
        if decoder.compiles_layers(options, device):
            parts.append("each layer compiled")
        elif options.fused and kernels.can_compile(device):
            parts.append("fused kernels")
        parts += ["LoRA inside the matmul"] if options.lora else []
        # offloading and kept attention are parts of gradient checkpointing: nothing to say without it
        checkpointed = any(
            getattr(layer, "gradient_checkpointing", False) for layer in lm.get_decoder().layers
        )
        parts += (
            ["checkpointed layers' inputs in CPU memory"]
            if checkpointed and decoder.offloads(options, device)
            else []
        )
        parts += (
            ["attention not recomputed"]
            if checkpointed and decoder.keeps_attention(lm, options, device)
            else []
        )
        return ", ".join([*parts, "chunked loss"])
    return "chunked loss"


def loss_sum(model: Any, batch: dict[str, torch.Tensor], options: Options = ALL) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions of a padded or packed batch."""
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    if options.varlen and decoder.supports(lm):
        flat = varlen.flatten(batch)
        hidden = decoder.hidden_states(lm, flat, options)
        keep = flat.targets != IGNORE
        return chunked_cross_entropy(hidden[keep], head.weight, flat.targets[keep])
    inner = lm.get_decoder()
    if "position_ids" in batch:
        out = inner(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    else:
        out = inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    return chunked_cross_entropy(hidden[keep], head.weight, labels[keep])


class Objective(torch.nn.Module):
    """:func:`loss_sum` as the forward of a module around ``model``: the training step calls it,
    and DDP, which reduces the gradients of what runs inside its own forward, can wrap it (the loss
    calls the decoder's parts itself, not the model's forward). The parameters are ``model``'s own
    (named ``model.*``; :func:`danlu.distributed.unwrap` takes the module off again)."""

    def __init__(self, model: Any, options: Options = ALL) -> None:
        super().__init__()
        self.model = model
        self.options = options

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(self.model, batch, self.options)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sum(cross_entropy(hidden @ weight.T, targets))`` with one chunk of logits alive at a time."""
    return _LinearCrossEntropy.apply(hidden, weight, targets)


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss and its gradients in one pass over the chunks: each chunk's logits become their own
    gradient (softmax minus one-hot) in place and are multiplied back at once, so the backward
    only scales the stored gradients (hidden: trained tokens x hidden; the head's, if it trains)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = kernels.compute_dtype(hidden)
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, dtype=dtype) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grads = grad_hidden is not None or grad_weight is not None
        fused = grads and kernels.can_compile(hidden.device)
        for start in range(0, targets.numel(), CHUNK):
            h, t = hidden[start : start + CHUNK].to(dtype), targets[start : start + CHUNK]
            if fused:
                loss, grad = _fused_chunk(F.linear(h, w), t)  # no fp32 copy of the chunk's logits
                total += loss
            else:
                logits = F.linear(h, w).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not grads:
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                grad[torch.arange(t.numel(), device=t.device), t] -= 1.0
                grad = grad.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + CHUNK] = grad @ w
            if grad_weight is not None:
                grad_weight.add_(grad.t() @ h)  # accumulated in fp32 over the chunks
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (
            (grad_hidden * grad_out).to(hidden_dtype) if grad_hidden is not None else None,
            (grad_weight * grad_out).to(weight_dtype) if grad_weight is not None else None,
            None,
        )


def _chunk(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of one chunk of logits and its gradient (softmax minus one-hot), in
    fp32 arithmetic, the gradient in the logits' dtype: compiled, one reduction and one
    elementwise kernel (the eager steps above make five passes over an fp32 copy: on Llama-3-8B
    each chunk's fp32 logits are 0.5 GiB)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, targets[:, None]).squeeze(1)).sum()
    hot = torch.arange(x.shape[1], device=x.device) == targets[:, None]
    grad = torch.exp(x - lse[:, None]) - hot.to(x.dtype)
    return loss, grad.to(logits.dtype)


def _fused_chunk(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.pick(_chunk, True, logits.device)(logits, targets)


def sequence_logps(
    model: Any, batch: dict[str, torch.Tensor], options: Options | None = ALL
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a padded batch: the summed log-probability of its labelled tokens and their
    count. ``options`` None runs the model's own forward (its full logits, the plain path);
    otherwise the hidden states (padding-free where :func:`loss_sum` would be) go through
    :func:`chunked_token_logps`, never the whole logits. A batch of pairs that carries
    :data:`danlu.fast.pairs.PROMPT_LENGTHS` runs each pair's prompt once on the padding-free path."""
    rows = batch["input_ids"].shape[0]
    if options is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        logits = out.logits[:, :-1][keep].float()
        logps = logits.log_softmax(-1).gather(1, labels[keep][:, None]).squeeze(1)
        row = keep.nonzero()[:, 0]
    else:
        lm = _causal_lm(model)
        head = lm.get_output_embeddings()
        if options.varlen and options.prefix and decoder.supports(lm) and pairs.PROMPT_LENGTHS in batch:
            flat, scored = pairs.flatten(batch)  # each pair's prompt once, for both replies
            hidden = decoder.hidden_states(lm, flat, options)
            row = scored.rows
            logps = chunked_token_logps(hidden.index_select(0, scored.index), head.weight, scored.targets)
        elif options.varlen and decoder.supports(lm):
            flat = varlen.flatten(batch)
            hidden = decoder.hidden_states(lm, flat, options)
            keep = flat.targets != IGNORE
            position = keep.nonzero()[:, 0]
            row = torch.searchsorted(flat.cu_seqlens[1:].long(), position, right=True)
            logps = chunked_token_logps(hidden[keep], head.weight, flat.targets[keep])
        else:
            out = lm.get_decoder()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            )
            labels = batch["labels"][:, 1:]
            keep = labels != IGNORE
            row = keep.nonzero()[:, 0]
            logps = chunked_token_logps(out.last_hidden_state[:, :-1][keep], head.weight, labels[keep])
    sums = torch.zeros(rows, dtype=torch.float32, device=logps.device).index_add(0, row, logps.float())
    counts = torch.bincount(row, minlength=rows)
    return sums, counts


class SequenceLogps(Objective):
    """:func:`sequence_logps` as a module's forward, so DDP can wrap it like :class:`Objective`
    (whose parameter names and unwrapping it shares); ``options`` None: the plain path."""

    def __init__(self, model: Any, options: Options | None = ALL) -> None:
        super().__init__(model)
        self.options = options

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(self.model, batch, self.options)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T)[i, targets[i]]`` per token, one chunk of logits at a time.

    A token's log-prob depends on its own hidden state only, so its gradient there,
    ``weight[target] - softmax @ weight``, is computed in the forward and only scaled by the
    incoming gradient in the backward. The head's gradient (when the head trains) needs the
    incoming gradient inside the sum over tokens: the backward recomputes each chunk's softmax."""
    return _LinearLogProbs.apply(hidden, weight, targets)


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = kernels.compute_dtype(hidden)
        w = weight.to(dtype)
        out = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, dtype=dtype) if ctx.needs_input_grad[0] else None
        for start in range(0, targets.numel(), CHUNK):
            h, t = hidden[start : start + CHUNK].to(dtype), targets[start : start + CHUNK]
            logits = F.linear(h, w).float()
            lse = torch.logsumexp(logits, dim=-1)
            out[start : start + CHUNK] = logits.gather(1, t[:, None]).squeeze(1) - lse
            if grad_hidden is not None:
                grad = logits.sub_(lse[:, None]).exp_().neg_()  # one-hot minus softmax, in place
                grad[torch.arange(t.numel(), device=t.device), t] += 1.0
                grad_hidden[start : start + CHUNK] = grad.to(dtype) @ w
        ctx.save_for_backward(grad_hidden, hidden if ctx.needs_input_grad[1] else None, weight, targets)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_hidden, hidden, weight, targets = ctx.saved_tensors
        g_hidden = (grad_hidden * grad_out[:, None]).to(ctx.hidden_dtype) if grad_hidden is not None else None
        g_weight = None
        if hidden is not None:
            dtype = kernels.compute_dtype(hidden)
            w = weight.to(dtype)
            g_weight = torch.zeros_like(weight, dtype=torch.float32)
            for start in range(0, targets.numel(), CHUNK):
                h, t = hidden[start : start + CHUNK].to(dtype), targets[start : start + CHUNK]
                grad = F.linear(h, w).float().softmax(-1).neg_()
                grad[torch.arange(t.numel(), device=t.device), t] += 1.0
                grad *= grad_out[start : start + CHUNK, None]
                g_weight.add_(grad.to(dtype).t() @ h)
            g_weight = g_weight.to(weight.dtype)
        return g_hidden, g_weight, None


def _causal_lm(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
