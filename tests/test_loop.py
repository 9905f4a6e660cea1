"""The decoding loop: greedy speculative output equals plain greedy output; the KV cache equals
plain decoding's; an oracle drafter reaches the maximum accepted length every step."""

import pytest
import torch
from transformers import DynamicCache

from draftheads.acceptance import SamplingConfig
from draftheads.generate import Decoder, Stats
from draftheads.kvcache import TreeKVCache, cache_keyword
from draftheads.tree import chain, load_tree
from tiny import ARCHS, tiny_heads, tiny_model

N_NEW = 48


def run(decoder, prompt, n=N_NEW, tree=None, cache=None, stats=None):
    out = []
    for step in decoder.steps(prompt, n, SamplingConfig(), stats or Stats(), tree, cache=cache):
        out += step
        if len(out) >= n:
            break
    return out[:n]


def hf_greedy(model, prompt, n=N_NEW):
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def decoder_on(path, model, heads=None, tree=None):
    """A Decoder on the lean Llama-family forward ("lean") or transformers' own forward ("generic")."""
    decoder = Decoder(model, heads, tree)
    assert decoder.lean is not None  # every tiny architecture is Llama-family
    if path == "generic":
        decoder.lean = None
    return decoder


@pytest.mark.parametrize("path", ["lean", "generic"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("tree", ["medusa63", "medusa16", "chain3"])
def test_greedy_speculative_equals_plain_greedy(arch, tree, path):
    model = tiny_model(arch)
    heads = tiny_heads(model, num_heads=3)
    prompt = torch.randint(0, 200, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = hf_greedy(model, prompt)
    assert run(decoder_on(path, model), prompt) == reference  # our plain loop
    stats = Stats()
    assert run(decoder_on(path, model, heads, load_tree(tree, 3)), prompt, stats=stats) == reference
    assert stats.steps < N_NEW  # sanity: the loop stepped, and sometimes accepted a draft


class OracleHeads:
    """A drafter that knows the true continuation: rank 0 of head k is the right token, other ranks
    are wrong. With it every step must accept a full path (the bookkeeping proof)."""

    def __init__(self, continuation, vocab):
        self.continuation, self.vocab, self.emitted = continuation, vocab, 0

    def reset(self):
        pass

    def observe(self, hidden, ids=None):
        pass

    def draft(self, hidden, root, tree):
        # root is continuation[pos]; head k proposes continuation[pos + 1 + k] at rank 0.
        tt = tree.tensors(hidden.device, hidden.dtype)
        head_of, rank_of, pos = tt.head_of, tt.rank_of, self.emitted
        truth = torch.tensor([self.continuation[min(pos + 1 + k, len(self.continuation) - 1)]
                              for k in range(int(head_of.max()) + 1)])
        wrong = (truth[head_of] + 1 + rank_of) % self.vocab
        return torch.cat([root.view(1), torch.where(rank_of == 0, truth[head_of], wrong)])


@pytest.mark.parametrize("tree", ["chain4", "medusa16"])
def test_oracle_drafter_accepts_full_depth_every_step(tree):
    model = tiny_model("llama")
    prompt = list(range(30, 42))
    truth = hf_greedy(model, prompt, 64)
    t = load_tree(tree, 4)
    oracle = OracleHeads(truth, model.config.vocab_size)
    decoder, stats, out = Decoder(model, oracle, t), Stats(), []
    for step in decoder.steps(prompt, 40, SamplingConfig(), stats, t):
        out += step
        oracle.emitted = len(out) - 1  # position of the next root in the continuation
        if len(out) >= 40:
            break
    assert out[:40] == truth[:40]
    assert stats.accepted[:-1] == [t.depth + 1] * (len(stats.accepted) - 1)


@pytest.mark.parametrize("path", ["lean", "generic"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_compacted_cache_equals_plain_decoding_cache(arch, path):
    model = tiny_model(arch)
    heads = tiny_heads(model, num_heads=3, noise=0.02)
    prompt = list(range(50, 60))
    tree = load_tree("medusa63", 3)
    cache = TreeKVCache.for_model(model, 200)
    kept = []
    keep = cache.keep
    cache.keep = lambda nodes, start: (kept.append(nodes), keep(nodes, start))
    out = []
    for step in decoder_on(path, model, heads, tree).steps(prompt, 40, SamplingConfig(), Stats(), tree, cache=cache):
        out += step
        # Everything but the newest token (the next root) is in the cache.
        seen = prompt + out[:-1]
        assert cache.length == len(seen)
        ref = DynamicCache(config=model.config)
        model(torch.tensor([seen]), use_cache=True, **{cache_keyword(model): ref})
        for i, layer in enumerate(ref.layers):
            torch.testing.assert_close(cache.kv[i, 0, :, :, :len(seen)], layer.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(cache.kv[i, 1, :, :, :len(seen)], layer.values, atol=1e-5, rtol=1e-4)
        if len(out) >= 40:
            break
    moved = [n for n in kept if n != list(range(len(n)))]
    assert moved, "no accepted path needed moving: the test would not exercise compaction"


def test_chain_tree_shapes():
    t = chain(3)
    assert t.size == 4 and t.depth == 3 and t.topk == 1
