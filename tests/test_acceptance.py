"""Acceptance rules: exact cases with forced logits, and a seeded statistical test that `exact`
sampling reproduces the backbone's own sampling distribution (and that a biased rule fails it)."""

import itertools

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from draftheads.acceptance import SamplingConfig, accept_greedy, accept_typical, greedy_tokens, sampling_probs
from draftheads.errors import UserError
from draftheads.generate import Decoder, Stats
from draftheads.tree import Tree
from tiny import tiny_heads, tiny_model

TREE = Tree([[0], [1], [0, 0], [0, 1], [1, 0]])  # nodes: 0 root, 1=[0], 2=[1], 3=[0,0], 4=[0,1], 5=[1,0]


def forced_logits(choices: dict[int, int], vocab=10) -> torch.Tensor:
    logits = torch.zeros(TREE.size, vocab)
    for node, token in choices.items():
        logits[node, token] = 5.0
    return logits


def test_greedy_follows_the_argmax_down_the_tree():
    cands = torch.tensor([9, 1, 2, 3, 4, 5])
    # root predicts 2 (node 2), node 2 predicts 5 (node 5), node 5 predicts 7 (no child): accept 0,2,5 then 7
    nodes, nxt = accept_greedy(forced_logits({0: 2, 2: 5, 5: 7}), cands, TREE)
    assert (nodes, nxt) == ([0, 2, 5], 7)
    nodes, nxt = accept_greedy(forced_logits({0: 8}), cands, TREE)
    assert (nodes, nxt) == ([0], 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_tokens_are_torch_argmax_with_the_first_of_equal_maxima(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 49152, generator=g).to(dtype)
    logits[1, [5, 9, 40000]] = 30.0  # a tie: the first index wins, as torch.argmax's
    logits[4] = 0.0  # all equal
    assert greedy_tokens(logits) == logits.argmax(-1).tolist()
    assert greedy_tokens(logits)[1] == 5 and greedy_tokens(logits)[4] == 0
    assert greedy_tokens(logits[3]) == int(logits[3].argmax()) and isinstance(greedy_tokens(logits[3]), int)
    with torch.inference_mode():  # the decoders' logits are inference tensors
        assert greedy_tokens(logits * 1) == logits.argmax(-1).tolist()


def test_typical_accepts_above_threshold_and_is_greedy_at_low_entropy():
    cands = torch.tensor([9, 1, 2, 3, 4, 5])
    logits = forced_logits({0: 1, 1: 4, 4: 0})
    sp = SamplingConfig(temperature=1.0, acceptance="typical")
    nodes, _ = accept_typical(logits, cands, TREE, sp, torch.Generator().manual_seed(0))
    assert nodes == [0, 1, 4]
    # A flat distribution has a low threshold (eps) but every token is below it at vocab 10? no:
    # p = 0.1 > min(0.09, 0.3 * exp(-ln 10)) = 0.03, so the most probable child is accepted.
    nodes, _ = accept_typical(torch.zeros(TREE.size, 10), cands, TREE, sp, torch.Generator().manual_seed(0))
    assert len(nodes) == 3


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6)])
def test_sampling_probs_match_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    expected = warpers(None, logits.clone()).softmax(-1)
    got = sampling_probs(logits, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, acceptance="exact"))
    torch.testing.assert_close(got, expected)


def test_bad_sampling_settings_are_user_errors():
    with pytest.raises(UserError):
        SamplingConfig(acceptance="nucleus")
    with pytest.raises(UserError):
        SamplingConfig(temperature=0.5, acceptance="greedy")
    with pytest.raises(UserError):
        SamplingConfig(temperature=0.5, top_p=0, acceptance="exact")


VOCAB, N_TOKENS, SAMPLES = 4, 3, 2500


def _exact_distribution(model, prompt, sp):
    """P(x1..x3 | prompt) of the backbone's own sampling, enumerated over all 4^3 sequences."""
    seqs = list(itertools.product(range(VOCAB), repeat=N_TOKENS))
    ids = torch.tensor([prompt + list(s) for s in seqs])
    with torch.no_grad():
        logits = model(ids).logits[:, len(prompt) - 1:-1]  # [seqs, 3, vocab]
    probs = sampling_probs(logits, sp)
    p = probs.gather(-1, torch.tensor(seqs).unsqueeze(-1)).squeeze(-1).prod(-1)
    return {s: float(q) for s, q in zip(seqs, p)}


def _sample_counts(decoder, prompt, sp, tree):
    counts = {}
    gen_stats = Stats()
    for i in range(SAMPLES):
        sp.seed = i
        out = []
        for step in decoder.steps(prompt, N_TOKENS, sp, gen_stats, tree):
            out += step
            if len(out) >= N_TOKENS:
                break
        key = tuple(out[:N_TOKENS])
        counts[key] = counts.get(key, 0) + 1
    return counts, gen_stats


def _chi_square_pvalue(counts, dist):
    cells = sorted(dist, key=dist.get, reverse=True)
    expected = [dist[c] * SAMPLES for c in cells]
    observed = [counts.get(c, 0) for c in cells]
    # Pool the rare cells so every expected count is >= 5 (the chi-square approximation needs it).
    while expected[-1] < 5:
        e, o = expected.pop(), observed.pop()
        expected[-1] += e
        observed[-1] += o
    assert sum(observed) == SAMPLES
    return chisquare(observed, [e * SAMPLES / sum(expected) for e in expected]).pvalue


@pytest.fixture(scope="module")
def small_vocab_setup():
    model = tiny_model("llama", seed=5, vocab=VOCAB)
    # Small init: spread-out distributions, so the drafts are accepted only part of the time.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)
    heads = tiny_heads(model, num_heads=2, noise=0.3)
    tree = Tree([[0], [1], [2], [0, 0], [0, 1], [1, 0]])
    return model, heads, tree, [0, 1, 2, 3, 2, 1]


def test_exact_sampling_matches_backbone_distribution(small_vocab_setup):
    model, heads, tree, prompt = small_vocab_setup
    sp = SamplingConfig(temperature=0.9, top_k=3, acceptance="exact")
    dist = _exact_distribution(model, prompt, sp)
    counts, stats = _sample_counts(Decoder(model, heads, tree), prompt, sp, tree)
    assert stats.mean_accepted > 1.2, "drafts were hardly ever accepted: the test would not exercise the tree"
    assert _chi_square_pvalue(counts, dist) > 1e-3


def test_statistical_test_rejects_a_biased_rule(small_vocab_setup):
    """The same test must fail for a rule that is not distribution-preserving (Medusa's typical rule
    with a loose threshold), or it proves nothing."""
    model, heads, tree, prompt = small_vocab_setup
    sp = SamplingConfig(temperature=0.9, top_k=3, acceptance="typical", typical_epsilon=0.3, typical_delta=0.9)
    dist = _exact_distribution(model, prompt, SamplingConfig(temperature=0.9, top_k=3, acceptance="exact"))
    counts, _ = _sample_counts(Decoder(model, heads, tree), prompt, sp, tree)
    assert _chi_square_pvalue(counts, dist) < 1e-3


def test_sampling_config_tiny_and_non_finite_temperatures():
    import math

    from draftheads.acceptance import SamplingConfig
    from draftheads.errors import UserError

    sp = SamplingConfig(temperature=1e-45, acceptance="exact")
    assert sp.temperature == 0 and sp.acceptance == "greedy"  # greedy in effect, and no inf/NaN logits
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(UserError, match="temperature"):
            SamplingConfig(temperature=bad, acceptance="exact")


def test_exact_sampling_with_lookup_branches_matches_backbone_distribution(small_vocab_setup):
    """Lookup branches (tokens given, not ranked) hang in the same tree; `exact` stays exact with them."""
    from draftheads.lookup import LookupConfig, PromptLookup

    model, heads, _, prompt = small_vocab_setup
    tree = Tree([[0]])  # a small heads tree leaves room for the branches (merged where they agree with it)
    sp = SamplingConfig(temperature=0.9, top_k=3, acceptance="exact")
    dist = _exact_distribution(model, prompt, sp)
    lookup = PromptLookup(LookupConfig(max_ngram=2, min_ngram=1, branches=2, tokens=2))
    counts, stats = _sample_counts(Decoder(model, heads, tree, lookup), prompt, sp, tree)
    assert stats.lookup_accepted > SAMPLES // 5, "lookup drafts were hardly accepted: the test would prove little"
    assert _chi_square_pvalue(counts, dist) > 1e-3


def test_exact_sampling_with_ngram_store_branches_matches_backbone_distribution(small_vocab_setup):
    """The n-gram store's chain is a function of the context too: `exact` stays exact with it."""
    from draftheads.lookup import LookupConfig, PromptLookup
    from draftheads.ngrams import NgramStore

    model, heads, _, prompt = small_vocab_setup
    tree = Tree([[0]])
    sp = SamplingConfig(temperature=0.9, top_k=3, acceptance="exact")
    dist = _exact_distribution(model, prompt, sp)
    # the store: what the backbone samples after the prompt, as distillation with temperature would give
    torch.manual_seed(0)
    samples = model.generate(torch.tensor([prompt] * 64), max_new_tokens=12, do_sample=True, top_k=3, temperature=0.9)
    store = NgramStore.build([(s, len(prompt)) for s in samples.tolist()], vocab_size=VOCAB, min_count=1)
    lookup = PromptLookup(LookupConfig(max_ngram=3, min_ngram=3, branches=1, tokens=2, store_tokens=2,
                                       store_min_prob=0.0), store)
    counts, stats = _sample_counts(Decoder(model, heads, tree, lookup), prompt, sp, tree)
    assert stats.lookup_accepted > SAMPLES // 5, "store drafts were hardly accepted: the test would prove little"
    assert _chi_square_pvalue(counts, dist) > 1e-3
