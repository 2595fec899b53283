"""A preference pair's prompt run once for both replies: the same log-probs and LoRA gradients as
the two whole rows, with the prompt's tokens through the decoder once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from danlu.data.render import IGNORE
from danlu.fast import ALL, Options, pairs, varlen
from danlu.fast.loss import sequence_logps
from test_fast_decoder import SHAPES, small

# (prompt, chosen reply, rejected reply) lengths: replies longer and shorter than each other, a
# one-token reply, and prompts longer than the sliding windows of SHAPES (4 to 7 tokens)
LENGTHS = [(9, 5, 11), (4, 1, 3), (12, 8, 8)]


# pairs whose rows all have 10 tokens: every sequence has as many keys (the dense attention's case)
EQUAL = [(6, 4, 4), (3, 7, 7)]


def pair_batch(vocab: int = 120, lengths: list[tuple[int, int, int]] = LENGTHS) -> dict[str, torch.Tensor]:
    """``[chosen..., rejected...]`` right-padded rows whose pairs share their prompt's tokens."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for prompt, chosen, rejected in lengths:
        p = torch.randint(3, vocab, (prompt,), generator=g)
        rows.append((p, torch.randint(3, vocab, (chosen,), generator=g)))
        rows.append((p, torch.randint(3, vocab, (rejected,), generator=g)))
    rows = rows[0::2] + rows[1::2]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n], mask[i, :n] = torch.cat([p, r]), 1
        labels[i, len(p) : n] = r
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shared(
    batch: dict[str, torch.Tensor], lengths: list[tuple[int, int, int]] = LENGTHS
) -> dict[str, torch.Tensor]:
    return {**batch, pairs.PROMPT_LENGTHS: pairs.prompt_lengths([p for p, _, _ in lengths])}


def test_the_shared_row_holds_each_prompt_once_and_scores_every_reply_token():
    flat, scored = pairs.flatten(shared(pair_batch()))
    tokens = sum(p + c + r for p, c, r in LENGTHS)
    assert flat.input_ids.numel() == tokens  # two whole rows would be the prompts' length more
    # sequences: chosen whole, then the rejected reply alone; its keys: the prompt, then itself
    assert flat.cu_seqlens.tolist() == [0, 14, 25, 30, 33, 53, 61]
    assert flat.cu_keys.tolist() == [0, 14, 34, 39, 46, 66, 86]
    assert flat.position_ids[14:25].tolist() == list(range(9, 20))  # after the prompt
    assert flat.keys[14:23].tolist() == list(range(9)) and flat.keys[23:34].tolist() == list(range(14, 25))
    # every labelled token once: each reply's length, its first token scored on the prompt's end
    counts = torch.bincount(scored.rows, minlength=6).tolist()
    assert counts == [5, 1, 8, 11, 3, 8]
    first_rejected = (scored.rows == 3).nonzero()[0, 0]
    assert scored.index[first_rejected] == 8  # the last prompt token, held by the chosen row


def test_attention_of_a_shared_prefix_is_causal_from_the_bottom_right():
    torch.manual_seed(0)
    # one sequence of 6 tokens; a second of 3 that attends to the first 4 of those, then to itself
    flat = varlen.Flat(
        torch.zeros(9, dtype=torch.long), torch.tensor([0, 1, 2, 3, 4, 5, 4, 5, 6]), None,
        torch.tensor([0, 6, 9], dtype=torch.int32), 6,
        keys=torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 6, 7, 8]),
        cu_keys=torch.tensor([0, 6, 13], dtype=torch.int32), max_keys=7,
    )  # fmt: skip
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    for window in (None, 3):
        out = varlen.attention(q, k, v, flat, 0.3, window=window)
        keys = torch.tensor([0, 1, 2, 3, 6, 7, 8])  # the second sequence's own view: 7 keys
        position = torch.arange(7)
        allowed = position[None, :] <= position[4:, None]
        if window is not None:
            allowed &= position[4:, None] - position[None, :] < window
        want = F.scaled_dot_product_attention(
            q[6:].transpose(0, 1),
            k[keys].repeat_interleave(2, 1).transpose(0, 1),
            v[keys].repeat_interleave(2, 1).transpose(0, 1),
            attn_mask=allowed,
            scale=0.3,
        ).transpose(0, 1)
        torch.testing.assert_close(out[6:], want)


@pytest.mark.parametrize("shape", ["llama", "qwen3", "mistral-window", "phi3-window", "gemma3"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_log_probs_and_lora_gradients_equal_whole_rows(shape, checkpointing):
    from peft import LoraConfig, get_peft_model

    model_type, extra = SHAPES[shape]
    base = small(model_type, **extra)
    if checkpointing:
        base.gradient_checkpointing_enable({"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    seen = []
    model.get_base_model().get_input_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(args[0].numel())
    )
    batch = pair_batch()
    weights = torch.linspace(-1.0, 2.0, 6)  # every row's log-prob counts differently

    def run(b: dict, options: Options | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        model.zero_grad(set_to_none=True)
        sums, counts = sequence_logps(model, b, options)
        (sums * weights).sum().backward()
        return (
            sums.detach(),
            counts,
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )

    whole, whole_counts, want = run(batch, ALL)
    assert seen.pop() == sum(p + c + p + r for p, c, r in LENGTHS)
    ours, counts, grads = run(shared(batch), ALL)
    assert seen.pop() == sum(p + c + r for p, c, r in LENGTHS)  # each prompt through the decoder once
    assert counts.tolist() == whole_counts.tolist() == [5, 1, 8, 11, 3, 8]
    torch.testing.assert_close(ours, whole, rtol=1e-5, atol=1e-4)
    assert grads.keys() == want.keys() and want
    for name, g in grads.items():
        assert (g - want[name]).norm() / want[name].norm() < 1e-4, name
    # the model's own forward (the plain path) ignores the key: its rows are whole
    plain = sequence_logps(model, shared(batch), None)[0]
    torch.testing.assert_close(plain.detach(), whole, rtol=1e-5, atol=1e-4)


def test_sharing_can_be_switched_off_for_the_ablation():
    model = small("llama")
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    with torch.no_grad():
        sequence_logps(model, shared(pair_batch()), Options(prefix=False))
    assert seen == [sum(2 * p + c + r for p, c, r in LENGTHS)]


def test_pairs_of_equal_length_run_shared_attention_as_a_dense_batch():
    """Queries gathered like the keys make each sequence a whole row again: the dense causal batch
    (cuDNN's kernel on CUDA; SDPA here), keeping each token's own query, equals the masked
    shared-prefix attention in values and gradients."""
    flat, _ = pairs.flatten(shared(pair_batch(lengths=EQUAL), EQUAL))
    assert varlen.uniform_keys(flat) and not varlen.uniform_keys(pairs.flatten(shared(pair_batch()))[0])
    # each token's own query: the chosen row's every key, the rejected row's keys after the prompt
    assert flat.queries.tolist() == [*range(0, 10), *range(16, 20), *range(20, 30), *range(33, 40)]
    torch.manual_seed(0)
    tokens = flat.input_ids.numel()
    q, k, v = (torch.randn(tokens, h, 8, requires_grad=True) for h in (4, 2, 2))
    grad = torch.randn(tokens, 4, 8)

    def run(dense):
        for t in (q, k, v):
            t.grad = None
        if dense:
            out = varlen.dense_shared(
                q, k.index_select(0, flat.keys), v.index_select(0, flat.keys), flat, 0.3
            )
        else:
            out = varlen.attention(q, k, v, flat, 0.3)  # one sequence at a time, masked
        out.backward(grad)
        return [out.detach(), *(t.grad.clone() for t in (q, k, v))]

    for ours, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(ours, want)


def test_the_gathers_backward_sums_every_copy_as_index_select_does():
    index = torch.tensor([0, 1, 2, 0, 1, 3, 2, 0])  # row 0 copied three times, row 4 never
    inverse = varlen.inverse(index, 5)
    assert inverse.tolist() == [[0, 3, 7], [1, 4, 8], [2, 6, 8], [5, 8, 8], [8, 8, 8]]
    x = torch.randn(5, 3, requires_grad=True)
    grad = torch.randn(8, 3)
    varlen.gather(x, index, inverse).backward(grad)
    ours, x.grad = x.grad, None
    x.index_select(0, index).backward(grad)
    torch.testing.assert_close(ours, x.grad)


def test_a_reference_forward_on_the_policys_batch_reuses_its_flattening(monkeypatch):
    calls = []
    real = pairs._flatten
    monkeypatch.setattr(pairs, "_flatten", lambda batch: calls.append(1) or real(batch))
    batch = shared(pair_batch())
    first = pairs.flatten(batch)
    assert pairs.flatten(batch) is not None and len(calls) == 1
    assert pairs.flatten(dict(batch))[0] is first[0]  # the same tensors in another dict
    again = shared(pair_batch())  # the same values in new tensors: flattened anew
    assert pairs.flatten(again)[0] is not first[0] and len(calls) == 2
