"""The engine really batches: requests that arrive together share every forward, a reply is the
same whatever else is in its batch, and a step's host work does not go row by row.

Not timed: forwards, transfers and outputs are counted and compared, so these fail when batching
breaks, not when the machine is busy.
"""

from __future__ import annotations

import random

import pytest
import torch

from danlu.infer import Engine, GenerationSettings
from danlu.infer.sampling import Row, Sampler

PROMPTS = [[{"role": "user", "content": "word " * (1 + 7 * i) + str(i)}] for i in range(8)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = Engine(str(tiny_model_dir), precision="fp32")
    yield e
    e.shutdown()


def together(engine: Engine, settings: list[GenerationSettings]) -> list:
    """Submit one request per settings while the decoder is held, so all join in one wave."""
    with engine.batcher.cond:  # the decoding thread waits here to admit: nothing starts yet
        gens = [engine.chat(PROMPTS[i % len(PROMPTS)], s) for i, s in enumerate(settings)]
    return gens


def count_forwards(engine: Engine) -> list[int]:
    """Rows in each forward of the model from now on."""
    seen: list[int] = []
    engine.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return seen


def test_requests_that_arrive_together_share_one_forward_per_step(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), precision="fp32")
    forwards = count_forwards(engine)
    settings = GenerationSettings(max_new_tokens=12, temperature=0.8, repetition_penalty=1.0)
    gens = together(engine, [settings] * 8)
    for g in gens:
        g.text()
    longest = max(g.completion_tokens for g in gens)
    assert longest > 1
    # one prefill forward gives every first token; then one forward per further token, all rows
    assert len(forwards) == longest and forwards[0] == 8
    assert forwards == sorted(forwards, reverse=True)  # rows only leave
    engine.shutdown()


def test_greedy_replies_in_a_batch_of_eight_equal_them_one_at_a_time(engine):
    """Also with every penalty and a logit bias (their counts are kept per row on the device)."""
    plain = GenerationSettings(max_new_tokens=10, temperature=0, repetition_penalty=1.0)
    penalized = GenerationSettings(
        max_new_tokens=10,
        temperature=0,
        repetition_penalty=1.5,
        presence_penalty=0.7,
        frequency_penalty=0.4,
        logit_bias={17: 3.0, 42: -100.0},
    )
    settings = [plain, penalized] * 4
    alone = [engine.chat(PROMPTS[i], s).text() for i, s in enumerate(settings)]
    batched = [g.text() for g in together(engine, settings)]
    assert batched == alone
    assert alone[0] != alone[1]  # the penalties did something


def test_a_seeded_reply_does_not_depend_on_its_batch(engine):
    seeded = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=0, seed=7)
    other = GenerationSettings(max_new_tokens=12, temperature=1.2, top_k=20)
    alone = engine.chat(PROMPTS[0], seeded).text()
    gens = together(engine, [seeded, other, other, other])
    assert gens[0].text() == alone
    for g in gens[1:]:
        g.text()


def test_one_device_to_host_transfer_per_decoding_step(engine, monkeypatch):
    """The tokens of every row come back in one transfer; nothing is read back row by row."""
    reads = 0
    for name in ("tolist", "item"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **kw):
            nonlocal reads
            reads += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    forwards = count_forwards(engine)
    settings = GenerationSettings(max_new_tokens=16, temperature=0.7, repetition_penalty=1.2)
    for g in together(engine, [settings] * 6):
        g.text()
    assert len(forwards) >= 8
    assert reads <= len(forwards) + 6  # one per step, plus at most one each time rows leave


def reference_penalties(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Penalties and bias row by row, as transformers and OpenAI define them."""
    out = logits.clone()
    for i, row in enumerate(rows):
        s = row.settings
        for t in set(row.prompt) | set(row.generated):
            v = out[i, t]
            out[i, t] = v * s.repetition_penalty if v < 0 else v / s.repetition_penalty
        for t in set(row.generated):
            out[i, t] -= row.generated.count(t) * s.frequency_penalty + s.presence_penalty
        for t, b in (s.logit_bias or {}).items():
            out[i, t] += b
    return out


def test_batched_penalties_equal_row_by_row_ones():
    rng = random.Random(0)
    rows = [
        Row(
            GenerationSettings(
                repetition_penalty=rng.choice([1.0, 1.3]),
                presence_penalty=rng.choice([0.0, 0.5]),
                frequency_penalty=rng.choice([0.0, 0.25]),
                logit_bias=rng.choice([None, {3: 2.0, 5: -1.0}]),
            ),
            [rng.randrange(50) for _ in range(rng.randint(1, 20))],
            [rng.randrange(50) for _ in range(rng.randint(0, 20))],
        )
        for _ in range(6)
    ]
    logits = torch.randn(6, 50)
    sampler = Sampler()
    assert torch.allclose(sampler._penalize(logits, rows), reference_penalties(logits, rows))
    # a step later (its token counted by the sampler) and after rows leave, still the same
    tokens = torch.tensor([rng.randrange(50) for _ in rows])
    sampler.counts.scatter_add_(1, tokens[:, None], torch.ones(6, 1))
    sampler.seen.scatter_(1, tokens[:, None], True)
    for row, t in zip(rows, tokens.tolist(), strict=True):
        row.generated.append(t)
    keep = torch.tensor([0, 2, 5])
    sampler.keep(keep)
    kept = [rows[i] for i in keep.tolist()]
    assert torch.allclose(sampler._penalize(logits[keep], kept), reference_penalties(logits[keep], kept))


def test_sampling_keeps_to_top_k_and_top_p():
    """Every draw is inside its row's top-k and nucleus; a greedy row takes the argmax."""
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 3
    rows = [
        Row(GenerationSettings(temperature=1.0, top_k=3, top_p=1.0), [1], []),
        Row(GenerationSettings(temperature=1.0, top_k=0, top_p=0.5), [1], []),
        Row(GenerationSettings(temperature=0.0), [1], []),
    ]
    probs = logits.softmax(-1)
    order = probs.sort(-1, descending=True)
    nucleus = set(order.indices[1, : int((order.values[1].cumsum(0) < 0.5).sum()) + 1].tolist())
    for _ in range(200):
        tokens, _, _ = Sampler().choose(logits, rows, None)
        assert tokens[0] in set(logits[0].topk(3).indices.tolist())
        assert tokens[1] in nucleus
        assert tokens[2] == int(logits[2].argmax())


def test_readers_on_one_asyncio_loop_are_woken_once_per_step(engine):
    """However many replies moved in a step, their loop gets one call from the decoding thread."""
    import asyncio

    forwards = count_forwards(engine)
    settings = GenerationSettings(max_new_tokens=10, temperature=0.7, repetition_penalty=1.0)

    async def read_all() -> tuple[list[str], int]:
        loop = asyncio.get_running_loop()
        calls = 0
        real = loop.call_soon_threadsafe

        def counted(*a, **kw):
            nonlocal calls
            calls += 1
            return real(*a, **kw)

        loop.call_soon_threadsafe = counted

        async def text(g) -> str:
            return "".join([d.text async for d in g.deltas_async()])

        texts = await asyncio.gather(*[text(g) for g in together(engine, [settings] * 8)])
        return texts, calls

    texts, calls = asyncio.run(read_all())
    assert any(texts)
    assert calls <= len(forwards) + 2  # one per step (plus the readers' own first look)


def test_a_reader_that_fell_behind_gets_what_piled_up_as_one_piece():
    from danlu.infer.generation import Delta, Generation
    from danlu.infer.sampling import TokenLogprob

    gen = Generation(3, 10)
    entries = [TokenLogprob(t, i, -1.0) for i, t in enumerate("abc")]
    for e in entries:
        gen._push(Delta(e.token, [e]))
    items, done = gen.poll()
    assert [(d.text, d.logprobs) for d in items] == [("abc", entries)] and not done
    gen._finish("length")
    assert gen.poll() == ([], True)


def test_draws_follow_the_distribution():
    """The inverse-CDF draw picks each token as often as its probability says (4,000 draws)."""
    from danlu.infer.sampling import rng_for

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5, 1.5, -2.0]])
    row = Row(GenerationSettings(temperature=1.0, top_k=0, top_p=1.0), [1], [], rng_for(1))
    sampler = Sampler()
    counts = torch.zeros(8)
    for _ in range(4000):
        tokens, _, _ = sampler.choose(logits, [row], None)
        counts[tokens[0]] += 1
    assert counts[4] == 0
    assert torch.allclose(counts / 4000, logits.softmax(-1)[0], atol=0.025)


@pytest.mark.gpu
def test_on_the_gpu_a_batch_decodes_as_rows_alone_with_one_read_a_step(tiny_model_dir, monkeypatch):
    """The same on CUDA, where the step's inputs are copied to the device without waiting and
    the chosen tokens are the step's only read back (``tolist``; transformers' own mask checks
    may add syncs of theirs)."""
    engine = Engine(str(tiny_model_dir), precision="fp32")
    assert engine.device == "cuda"
    greedy = GenerationSettings(
        max_new_tokens=10, temperature=0, repetition_penalty=1.3, logit_bias={17: 2.0}
    )
    seeded = GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    settings = [greedy, seeded] * 4
    alone = [engine.chat(PROMPTS[i], s).text() for i, s in enumerate(settings)]
    reads = 0
    real = torch.Tensor.tolist

    def counted(self, *a, **kw):
        nonlocal reads
        reads += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    forwards = count_forwards(engine)
    assert [g.text() for g in together(engine, settings)] == alone
    assert reads <= len(forwards) + 8
    engine.shutdown()
