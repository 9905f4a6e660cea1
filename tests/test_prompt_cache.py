"""Prefix caching (kvcache.PromptCache): a prompt that starts as a recent one did prefills only the rest,
on the serial loop (TorchEngine.prefill, lean and generic forward) and in a batch slot (PrefillChunks),
and decodes what it decodes without the cache."""

import httpx
import pytest
import torch
from openai import OpenAI
from test_batch import drive
from test_loop import decoder_on, hf_greedy
from test_server import Server
from tiny import tiny_draftmodel, tiny_heads, tiny_model

from draftheads.acceptance import SamplingConfig
from draftheads.batch import BatchDecoder
from draftheads.generate import Decoder, Stats
from draftheads.kvcache import PromptCache
from draftheads.server import create_app
from draftheads.tree import load_tree

SYSTEM = list(range(40, 64))  # 24 tokens every prompt starts with, as a chat template's system prompt


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [SYSTEM + torch.randint(0, 200, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("path", ["lean", "generic"])
def test_a_cached_start_gives_the_prefill_a_fresh_one_gives(path):
    model = tiny_model()
    engine = decoder_on(path, model).engine
    a, b = SYSTEM + [1, 2, 3, 4], SYSTEM + [9, 8, 7]

    def prefill(ids):
        cache = engine.new_cache(64)
        hidden, logits = engine.prefill(cache, torch.tensor(ids))
        return cache, hidden, logits

    fresh = [prefill(ids) for ids in (a, b, b)]
    assert engine.use_prompt_cache(1000) is None
    cached = [prefill(ids) for ids in (a, b, b)]
    assert engine.prompt_cache.counts == {"prompts": 3, "hits": 2, "tokens": 3 * 27 + 1, "tokens_reused": 24 + 26}
    for (c0, h0, l0), (c1, h1, l1) in zip(fresh, cached):
        assert c1.length == c0.length
        torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(c1.kv[..., :c0.length, :], c0.kv[..., :c0.length, :], atol=1e-5, rtol=1e-5)


def test_the_longest_start_wins_and_short_matches_prefill_whole():
    model = tiny_model()
    engine = Decoder(model).engine
    engine.use_prompt_cache(1000)
    cache = lambda: engine.new_cache(64)
    for ids in (SYSTEM[:10] + [5] * 10, SYSTEM + [5, 6]):
        engine.prefill(cache(), torch.tensor(ids))
    c = cache()
    done = engine.prompt_cache.restore(c, SYSTEM + [5, 7])  # 25 tokens match the second, 10 the first
    assert done.shape[0] == 25 and c.length == 25
    assert engine.prompt_cache.restore(cache(), [1, 2, 3] + SYSTEM) is None  # nothing at the start: no hit
    few = PromptCache(1000, min_tokens=8)
    few.store(SYSTEM[:7] + [1], c, done[:8])
    assert few.restore(cache(), SYSTEM[:7] + [2, 3]) is None  # 7 < min_tokens
    assert few.restore(cache(), SYSTEM[:7] + [1, 9]).shape[0] == 8  # exactly min_tokens: a hit


def test_least_recently_used_prompts_go_first_and_a_prompt_too_long_is_not_kept():
    model = tiny_model()
    engine = Decoder(model).engine
    engine.use_prompt_cache(50)
    one, two, three = ([k] * 20 for k in (1, 2, 3))
    for ids in (one, two, one, three):  # `one` used again after `two`: `two` goes when `three` comes
        engine.prefill(engine.new_cache(64), torch.tensor(ids))
    prompts_held = engine.prompt_cache.entries
    assert list(prompts_held) == [tuple(one), tuple(three)] and engine.prompt_cache.held == 40
    engine.prefill(engine.new_cache(64), torch.tensor([4] * 51))
    assert list(prompts_held) == [tuple(one), tuple(three)]
    engine.prefill(engine.new_cache(64), torch.tensor([5] * 50))  # exactly the budget: kept, alone
    assert list(prompts_held) == [(5,) * 50] and engine.prompt_cache.held == 50
    engine.use_prompt_cache(60)
    for ids in (one, two, three):  # exactly the budget: all three kept
        engine.prefill(engine.new_cache(64), torch.tensor(ids))
    assert len(engine.prompt_cache.entries) == 3 and engine.prompt_cache.held == 60


@pytest.mark.parametrize("path", ["lean", "generic"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_decoding_with_cached_starts_equals_plain_greedy(arch, path):
    model = tiny_model(arch)
    decoder = decoder_on(path, model, tiny_heads(model), load_tree("medusa16", 3))
    decoder.engine.use_prompt_cache(1000)
    ps = prompts(4)
    for p in ps:
        steps, out = decoder.steps(p, 30, SamplingConfig(), Stats()), []
        while len(out) < 30:
            out += next(steps)
        assert out[:30] == hf_greedy(model, p, 30)
    assert decoder.engine.prompt_cache.counts["hits"] == 3


@pytest.mark.parametrize("chunk", [None, 4])
def test_batch_slots_prefill_cached_starts_and_stay_exact(chunk):
    model = tiny_model("qwen2")
    decoder = Decoder(model, tiny_heads(model), load_tree("medusa16", 3))
    decoder.engine.use_prompt_cache(1000)
    batch = BatchDecoder(decoder, slots=3, capacity=128, prefill_chunk=chunk, draft_confidence=0.0)
    ps = prompts(6, seed=4)
    got = drive(batch, [(p, SamplingConfig(), None) for p in ps], 30)
    assert got == [hf_greedy(model, p, 30) for p in ps]
    # Whole prompts: each is kept before the next joins. In chunks the first three start together, before
    # any is kept, and only the three that join later find one.
    hits = 5 if chunk is None else 3
    counts = decoder.engine.prompt_cache.counts
    assert counts["prompts"] == 6 and counts["hits"] == hits and counts["tokens_reused"] >= hits * len(SYSTEM)


def test_a_row_exact_engine_keeps_no_prompts():
    model = tiny_model().to(torch.bfloat16)
    engine = Decoder(model).engine
    assert engine.row_exact
    assert "prefills every prompt whole" in engine.use_prompt_cache(1000)
    assert engine.prompt_cache is None
    assert engine.use_prompt_cache(0) is None and engine.prompt_cache is None


TEXTS = ["first question", "a second, longer question", "first question"]
chat = lambda text: [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": text}]


@pytest.mark.parametrize("max_batch", [1, 3])
def test_the_server_reuses_the_chat_templates_start_and_health_counts_it(max_batch):
    model = tiny_draftmodel(tree="medusa16")
    srv = Server(create_app(model, max_batch=max_batch, prompt_cache_tokens=512))
    client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    try:
        replies = [client.chat.completions.create(model="tiny", messages=chat(t), max_tokens=12,
                                                  temperature=0).choices[0].message.content for t in TEXTS]
        counts = httpx.get(srv.url + "/health").json()["prompt_cache"]
    finally:
        srv.stop()
    assert counts["prompts"] == 3 and counts["hits"] == 2 and counts["tokens_reused"] > 0
    assert replies[0] == replies[2]
    model.decoder.engine.use_prompt_cache(0)
    alone = [model.generate(chat(t), max_new_tokens=12).text for t in TEXTS]
    assert replies == alone
