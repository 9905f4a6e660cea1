"""Deterministic pins for bugs the statistical and end-to-end tests let through (docs/mutation.md).

Each test names the planted bug it catches: the chi-square test of `exact` has too little power to
tell T from T^2, and no training test looks at which token a soft target belongs to.
"""

import torch

from draftheads.acceptance import (SamplingConfig, accept, accept_exact, accept_greedy, accept_typical, sample,
                                   sampling_probs)
from draftheads.train.data import IGNORE, head_targets
from draftheads.train.trainer import flat_examples, medusa_loss, next_hidden, sequence_batch, soft_targets
from draftheads.tree import Tree

TREE = Tree([[0], [1], [0, 0], [1, 0], [0, 0, 0]])


def _warped(logits, temperature, top_k=0):
    """The sampling distribution written out independently: softmax(logits / T) over the top-k."""
    x = logits.double() / temperature
    if top_k:
        x = x.masked_fill(x < x.topk(top_k).values[-1], float("-inf"))
    return x.softmax(-1)


def test_exact_token_is_a_multinomial_draw_from_the_warped_distribution():
    """Same generator, same draw: a temperature applied twice (T^2), or top-k skipped, changes tokens."""
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(3)) * 2
    leaf = Tree([])  # the root alone: the next token is one sample at the root
    for temperature, top_k in ((0.5, 0), (1.7, 0), (0.8, 4)):
        sp = SamplingConfig(temperature=temperature, top_k=top_k, acceptance="exact")
        probs = _warped(logits[0], temperature, top_k).float()
        for seed in range(40):
            nodes, token = accept_exact(logits, torch.zeros(1, dtype=torch.long), leaf, sp,
                                        torch.Generator().manual_seed(seed))
            want = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)))
            assert nodes == [0] and token == want, (temperature, top_k, seed)


def test_sampling_probs_is_softmax_over_temperature():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0)) * 3
    for temperature in (0.3, 1.0, 2.5):
        got = sampling_probs(logits, SamplingConfig(temperature=temperature, acceptance="exact"))
        torch.testing.assert_close(got.double(), _warped(logits, temperature))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]).log()
    for top_p, kept in ((0.45, 1), (0.6, 2), (0.8, 3), (0.92, 4), (0.99, 5), (1.0, 5)):
        p = sampling_probs(logits, SamplingConfig(temperature=1.0, top_p=top_p, acceptance="exact"))[0]
        assert int((p > 0).sum()) == kept, (top_p, p)


def test_top_p_boundary_drops_tokens_whose_cumulative_mass_reaches_one_minus_p():
    """transformers' TopP drops sorted tokens while cum <= 1 - p: at exactly 1 - p the token goes."""
    logits = torch.tensor([2.0, 1.0, 1.0]).log()  # probs 0.5, 0.25, 0.25: cumulative 0.25, 0.5, 1.0 exactly
    p = sampling_probs(logits, SamplingConfig(temperature=1.0, top_p=0.5, acceptance="exact"))
    assert p.tolist() == [1.0, 0.0, 0.0]


def test_sampling_settings_boundaries_and_messages():
    import pytest

    from draftheads.errors import UserError

    assert SamplingConfig(temperature=1e-5, acceptance="exact").temperature == 1e-5  # GREEDY_BELOW itself samples
    assert SamplingConfig(temperature=0.5, top_p=1.0, acceptance="exact").top_p == 1.0
    with pytest.raises(UserError, match=r"^temperature must be >= 0, top_p in \(0, 1\], top_k >= 0$"):
        SamplingConfig(temperature=0.5, top_p=1.5, acceptance="exact")
    with pytest.raises(UserError, match=r"^unknown acceptance rule 'nucleus'; choose one of greedy, typical, exact$"):
        SamplingConfig(temperature=0.5, acceptance="nucleus")
    with pytest.raises(UserError, match=r"^acceptance 'greedy' needs temperature 0; use 'exact' or 'typical' to sample$"):
        SamplingConfig(temperature=0.5, acceptance="greedy")


def test_accept_dispatches_to_the_named_rule():
    """accept(...) is accept_<rule>(...) with the same generator, on inputs where the rules disagree."""
    tree = Tree([[0], [1], [2], [0, 0], [1, 0]])
    differ = set()
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(tree.size, 4, generator=g) * 1.5
        cands = torch.randint(0, 4, (tree.size,), generator=g)
        got = {}
        for rule, fn in (("exact", accept_exact), ("typical", accept_typical)):
            sp = SamplingConfig(temperature=0.7, acceptance=rule, typical_epsilon=0.3, typical_delta=0.6)
            got[rule] = accept(logits, cands, tree, sp, torch.Generator().manual_seed(seed))
            assert got[rule] == fn(logits, cands, tree, sp, torch.Generator().manual_seed(seed)), (rule, seed)
        got["greedy"] = accept(logits, cands, tree, SamplingConfig(), None)
        assert got["greedy"] == accept_greedy(logits, cands, tree)
        differ.add(len({(tuple(v[0]), v[1]) for v in got.values()}) == 3)
    assert True in differ, "the inputs never told the three rules apart"


def test_sample_is_argmax_at_temperature_zero_and_draws_otherwise():
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert sample(logits, SamplingConfig(), None) == 1
    sp = SamplingConfig(temperature=50.0, acceptance="exact")
    draws = {sample(logits, sp, torch.Generator().manual_seed(s)) for s in range(30)}
    assert draws == {0, 1, 2}


def test_exact_follows_the_child_holding_the_sample_and_stops_otherwise():
    # Root: all mass on token 5 (candidate of node 1); node 1: all mass on 7 (node 3); node 3: on 9 (no child).
    logits = torch.full((TREE.size, 10), -1e4)
    cands = torch.tensor([0, 5, 6, 7, 8, 2])
    logits[0, 5] = logits[1, 7] = logits[3, 9] = 0
    sp = SamplingConfig(temperature=0.7, acceptance="exact")
    assert accept_exact(logits, cands, TREE, sp, torch.Generator().manual_seed(0)) == ([0, 1, 3], 9)
    assert accept(logits, cands, TREE, sp, torch.Generator().manual_seed(0)) == ([0, 1, 3], 9)
    assert accept_greedy(logits, cands, TREE) == ([0, 1, 3], 9)


def _typical_case(p_child, temperature):
    """Root logits over 4 tokens where the child (token 1) has probability p_child at `temperature`."""
    rest = (1 - p_child) / 3
    probs = torch.tensor([rest, p_child, rest, rest])
    logits = torch.full((2, 4), 0.0)
    logits[0] = probs.log() * temperature  # softmax(logits / T) == probs
    return logits, torch.tensor([0, 1]), Tree([[0]])


def test_typical_threshold_both_sides_at_temperature_not_one():
    """epsilon binds here (entropy is low): p(child) just above 0.09 is accepted, just below is not; at
    T=0.5 the rule must divide by T once (T^2 or no T moves p(child) far from the threshold)."""
    for temperature in (0.5, 2.0):
        sp = SamplingConfig(temperature=temperature, acceptance="typical", typical_epsilon=0.09, typical_delta=10.0)
        for p_child, accepted in ((0.095, True), (0.085, False)):
            logits, cands, tree = _typical_case(p_child, temperature)
            logits[1, 3] = 50.0  # after the child: token 3, whatever the draw
            follows = 0
            for seed in range(30):
                nodes, token = accept_typical(logits, cands, tree, sp, torch.Generator().manual_seed(seed))
                follows += nodes == [0, 1]
                assert token == 3 if nodes == [0, 1] else token != 1
            # Accepted: always followed. Rejected: followed only when the root's own draw is the child (~9%).
            assert follows == 30 if accepted else follows < 15, (temperature, p_child, follows)


def test_typical_delta_threshold_binds_at_high_entropy():
    """Uniform-ish root over 4 tokens: exp(-H) ~ 1/4, so delta * exp(-H) < epsilon decides."""
    sp_loose = SamplingConfig(temperature=1.0, acceptance="typical", typical_epsilon=0.9, typical_delta=0.9)
    sp_tight = SamplingConfig(temperature=1.0, acceptance="typical", typical_epsilon=0.9, typical_delta=1.2)
    logits, cands, tree = _typical_case(0.28, 1.0)
    logits[1, 3] = 50.0
    logits = torch.cat([logits, torch.full((2, 1), -40.0)], 1)  # a token of p ~ 0: entropy must still be finite
    # threshold ~ 0.9 * 0.257 = 0.23 < 0.28: accepted; 1.2 * 0.257 = 0.31 > 0.28: not accepted outright.
    for seed in range(10):
        assert accept_typical(logits, cands, tree, sp_loose, torch.Generator().manual_seed(seed))[0] == [0, 1]
    firsts = {tuple(accept_typical(logits, cands, tree, sp_tight, torch.Generator().manual_seed(s))[0]) for s in range(40)}
    assert (0,) in firsts


def test_typical_follows_the_most_probable_accepted_child():
    tree = Tree([[0], [1]])
    logits = torch.full((3, 5), 0.0)
    logits[0] = torch.tensor([0.0, 0.5, 0.3, 0.1, 0.1]).clamp(min=1e-6).log()  # node 1 (token 1) first and likelier
    logits[2, 4] = logits[1, 3] = 60.0
    sp = SamplingConfig(temperature=1.0, acceptance="typical", typical_epsilon=0.05, typical_delta=0.05)
    assert accept_typical(logits, torch.tensor([0, 1, 2]), tree, sp, torch.Generator().manual_seed(0)) == ([0, 1], 3)
    logits[0] = torch.tensor([0.0, 0.3, 0.5, 0.1, 0.1]).clamp(min=1e-6).log()  # now the second child is likelier
    assert accept_typical(logits, torch.tensor([0, 1, 2]), tree, sp, torch.Generator().manual_seed(0)) == ([0, 2], 4)


# ---------------------------------------------------------------- trainer targets

def test_soft_targets_belong_to_the_same_token_as_the_hard_targets():
    """A backbone that predicts the next token perfectly (hidden state t = one-hot of token t+1, LM head =
    identity): head k's soft target at t must put its mass on token t+2+k, its hard target. A one-position
    shift of the hidden states used for soft targets puts it on t+1+k or t+3+k."""
    V, K = 16, 3
    ids = torch.randint(0, V, (20,), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(20) >= 4
    h = torch.zeros(20, V)
    h[torch.arange(19), ids[1:]] = 30.0  # the last position predicts nothing in particular
    hidden, path, select, targets, nxt = sequence_batch([h], [(ids, mask)], K, soft=True)
    assert torch.equal(targets, head_targets(ids, mask, K)[select[0]])
    soft = soft_targets(torch.eye(V), nxt, None)  # [K, N, V]
    valid = targets.T != IGNORE
    assert valid.sum() > 20
    assert torch.equal(soft.argmax(-1)[valid], targets.T[valid])
    assert torch.equal(path[0, :5], torch.stack([ids[t + 1:t + 1 + K] for t in range(5)]))
    # The precomputed-features path: two sequences concatenated, positions from flat_examples.
    ids2 = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(1))
    h2 = torch.zeros(9, V)
    h2[torch.arange(8), ids2[1:]] = 30.0
    pos, tgt = flat_examples([(ids, mask), (ids2, torch.ones(9, dtype=torch.bool))], K)
    feats = torch.cat([h, h2])
    flat_soft = soft_targets(torch.eye(V), next_hidden(feats, pos, K), None)
    ok = tgt.T != IGNORE
    assert ok.sum() > 25 and torch.equal(flat_soft.argmax(-1)[ok], tgt.T[ok])
    assert torch.equal(pos[pos >= 20], torch.arange(20, 27))  # sequence 2 starts at 20; t+2 < 9 has a target
    # Under VocabTrim the distribution is over the kept ids, renormalised.
    vmap = torch.arange(0, V, 2)
    trimmed = soft_targets(torch.eye(V), nxt, vmap)
    assert trimmed.shape == (K, nxt.shape[1], V // 2)
    torch.testing.assert_close(trimmed.sum(-1), torch.ones(K, nxt.shape[1]))


def test_medusa_loss_weights_heads_by_decay_and_skips_ignored():
    K, N, V = 3, 4, 5
    logits = torch.randn(K, N, V, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, V, (N, K), generator=torch.Generator().manual_seed(1))
    targets[0, 1] = IGNORE
    targets[:, 2] = IGNORE
    loss, per_head = medusa_loss(logits, targets, 0.5)
    ce = [torch.nn.functional.cross_entropy(logits[k][targets[:, k] != IGNORE], targets[targets[:, k] != IGNORE, k])
          for k in range(2)]
    torch.testing.assert_close(per_head, torch.stack(ce + [torch.tensor(0.0)]))
    torch.testing.assert_close(loss, ce[0] + 0.5 * ce[1])
    # Soft targets equal to one-hots of the hard targets give the same loss.
    soft = torch.nn.functional.one_hot(targets.clamp(min=0).T, V).float()
    loss_soft, per_soft = medusa_loss(logits, targets, 0.5, soft)
    torch.testing.assert_close(per_soft, per_head)
    torch.testing.assert_close(loss_soft, loss)


# ---------------------------------------------------------------- tree

def test_tree_with_given_nodes_orders_validates_and_caches():
    import pytest

    from draftheads import tree as tree_mod
    from draftheads.errors import UserError

    ranked = Tree([[0], [1]], max_rank=3)
    assert ranked.with_given([]) is ranked
    t = ranked.with_given([[0, -1, -1], [1, -1], [0, -1], [-1]])
    assert ranked.with_given([(-1,), (1, -1), (0, -1), (0, -1, -1)]) is t  # one Tree per shape, any order
    # Ranked nodes keep their indices; given nodes follow, by (depth, path).
    assert t.paths == [(0,), (1,), (-1,), (0, -1), (1, -1), (0, -1, -1)]
    assert t.ranked_size == 3 and t.size == 7 and t.max_rank == 3
    assert t.given == [False] * 3 + [True] * 4
    assert t.ranked.paths == ranked.paths and t.ranked.size == 3 and ranked.ranked is ranked
    assert t.parent == [-1, 0, 0, 0, 1, 2, 4]
    tt = t.tensors("cpu", torch.float32)
    assert tt.head_of.tolist() == [0, 0] and tt.rank_of.tolist() == [0, 1]  # ranked nodes only
    assert t.levels("cpu")[0].nodes.tolist() == [1, 2] and len(t.levels("cpu")) == 1
    assert repr(t) == "Tree(7 nodes, 4 given, depth 3)" and repr(ranked) == "Tree(3 nodes, depth 1)"
    assert t.to_json() == [[0], [1], [-1], [0, -1], [1, -1], [0, -1, -1]]
    for bad, message in (([(2,)], "given path [2] must be ranks followed by given (negative) elements only"),
                         ([(0, -1, 0)], "given path [0, -1, 0] must be ranks followed by given (negative) elements only"),
                         ([(0, -1, 1)], "given path [0, -1, 1] must be ranks followed by given"),
                         ([(3, -1)], "tree path [3, -1] uses a rank outside 0..2 (candidates drawn per head)"),
                         ([(1, 0, -1)], "tree path [1, 0, -1] has no parent [1, 0] in the tree")):
        with pytest.raises(UserError, match="^" + message.replace("[", r"\[").replace("]", r"\]")
                           .replace("(", r"\(").replace(")", r"\)")):
            Tree(ranked.paths, 3, bad)
    with pytest.raises(UserError, match="^tree lists a path twice$"):
        Tree([[0]], 3, [(0, -1), (0, -1)])
    # The shape cache is bounded: past MAX_SHAPES it starts again.
    old = tree_mod.MAX_SHAPES
    try:
        tree_mod.MAX_SHAPES = 2
        a = ranked.with_given([[-1]])
        ranked.with_given([[-1], [-1, -1]])
        assert ranked.with_given([[-1]]) is not a and ranked.with_given([[-1]]) is ranked.with_given([[-1]])
    finally:
        tree_mod.MAX_SHAPES = old


def test_tree_errors_name_the_right_path_and_bound():
    import pytest

    from draftheads.errors import UserError

    Tree([[2]], max_rank=3)
    with pytest.raises(UserError, match=r"^tree path \[3\] uses a rank outside 0\.\.2 \(candidates drawn per head\)$"):
        Tree([[3]], max_rank=3)
    with pytest.raises(UserError, match=r"^tree path \[0, 1, 0\] has no parent \[0, 1\] in the tree$"):
        Tree([[0], [0, 1, 0]])
    with pytest.raises(UserError, match=r"^tree contains an empty path \(the root is implicit\)$"):
        Tree([[0], []])
    with pytest.raises(UserError, match=r"^tree path \[0, 0\] has depth 2 but the heads have only 1$"):
        Tree([[5], [0], [0, 0]]).check_heads(1)  # the deepest path, not the largest


def test_tree_tensors_and_levels_follow_device_and_dtype():
    t = Tree([[0], [1], [0, 0]])
    levels = t.levels("cpu")
    tt = t.tensors("cpu", torch.bfloat16)  # levels and tensors share one cache: keys must differ
    assert isinstance(levels, list) and tt.tree_bias.dtype == torch.bfloat16
    assert tt.tree_bias.min() == torch.finfo(torch.bfloat16).min and t.tensors("cpu", torch.bfloat16) is tt
    meta = t.tensors("meta", torch.bfloat16)  # same dtype, another device: another entry
    assert all(x.device.type == "meta" for x in (meta.tree_bias, meta.depths, meta.head_of, meta.rank_of))
    assert meta.rank_of.dtype == torch.long
    lv = t.levels("meta")
    assert lv is not levels
    assert all(x.device.type == "meta" for v in lv for x in (v.nodes, v.parent_paths, v.parent_pos, v.ranks))


def test_named_trees_and_tree_files(tmp_path):
    import json

    import pytest

    from draftheads.errors import UserError
    from draftheads.tree import MEDUSA63, chain, load_tree

    assert chain(3).paths == [(0,), (0, 0), (0, 0, 0)]
    assert load_tree("chain2").paths == [(0,), (0, 0)]
    assert load_tree("medusa1").paths == [(0,)]
    assert load_tree("medusa63").size == 1 + sum(len(p) <= 4 for p in MEDUSA63)  # default: 4 heads
    assert load_tree("medusa63", num_heads=5).size == 64
    assert load_tree("medusa11", num_heads=1).paths == [(0,), (1,), (2,), (3,), (4,)]
    t = Tree([[0]])
    assert load_tree(t) is t
    for name in ("medusa0", "medusa64", "chainx", "medusa", "chain0"):
        with pytest.raises(UserError, match="tree file not found"):
            load_tree(name)
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"tree": [[0], [1], [0, 0]]}))
    assert load_tree(str(f)).paths == [(0,), (1,), (0, 0)]
    f.write_text(json.dumps([[0], [0, 0]]))
    assert load_tree(f, num_heads=2).depth == 2
    with pytest.raises(UserError, match="depth 2 but the heads have only 1"):
        load_tree(f, num_heads=1)
    for bad in ({"paths": [[0]]}, [[0, 0.5]], [[0], "1"], [[0, "x"]], 3):
        f.write_text(json.dumps(bad))
        with pytest.raises(UserError, match="must hold a list of paths of ranks"):
            load_tree(f)
    with pytest.raises(UserError, match="rank outside"):
        Tree([[-1]])  # a negative element is a given node: never in a ranked path


# ---------------------------------------------------------------- KV cache

def test_attention_windows_bounds_and_messages():
    import types

    import pytest

    from draftheads.errors import UserError
    from draftheads.kvcache import attention_windows

    cfg = lambda **kw: types.SimpleNamespace(model_type="m", **kw)  # noqa: E731
    assert attention_windows(cfg(sliding_window=None)) == {"full_attention": None}
    assert attention_windows(cfg(sliding_window=1)) == {"sliding_attention": 1}
    assert attention_windows(cfg(sliding_window=4, layer_types=["full_attention", "sliding_attention"])) == \
        {"full_attention": None, "sliding_attention": 4}
    for bad in (0, None, 2.5):
        with pytest.raises(UserError, match=r"^m has sliding-window layers but no window size \(sliding_window="):
            attention_windows(cfg(sliding_window=bad, layer_types=["sliding_attention"]))
    with pytest.raises(UserError, match="^m has 'chunked_attention' layers; draftheads can mask full and "
                                        "sliding-window attention only$"):
        attention_windows(cfg(layer_types=["chunked_attention"]))


def test_tree_cache_keeps_dtype_and_device_and_refuses_overflow():
    import pytest

    from draftheads.kvcache import TreeKVCache

    for device in ("cpu", "meta"):
        cache = TreeKVCache(1, 6, torch.bfloat16, device, {"full_attention": None, "sliding_attention": 2})
        keys = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16, device=device)
        k, _ = cache.append(0, keys, keys)
        assert cache.kv.dtype == k.dtype == torch.bfloat16 and cache.kv.device.type == device
        bias = Tree([[0], [0, 0]]).tensors(device, torch.bfloat16).tree_bias
        masks = cache.attention_mask(bias, torch.arange(3, 6, device=device))
        for m in masks.values():
            assert m.dtype == torch.bfloat16 and m.device.type == device and m.shape == (1, 1, 3, 6)
        cache.append(0, keys, keys)
        cache.keep([0, 2], 3)
        assert cache.length == 5 and cache.kv.device.type == device
    cache = TreeKVCache(1, 4, torch.float32, "cpu")
    cache.append(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(AssertionError):
        cache.attention_mask(torch.zeros(2, 2))  # 3 cached + 2 new > 4
    with pytest.raises(AssertionError, match=r"^layer 0 keys \(1, 2, 1, 2\) / values \(1, 2, 1, 2\) do not fit the "
                                             r"cache slots \(1, 1, 1, 2\)$"):
        cache.append(0, torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2))  # another layer's kv heads
    with pytest.raises(AssertionError, match="^KV cache overflow: the loop must keep within capacity$"):
        cache.append(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(AssertionError, match="^a sliding-window mask needs the new tokens' positions$"):
        TreeKVCache(1, 4, torch.float32, "cpu", {"sliding_attention": 2}).attention_mask(torch.zeros(1, 1))
    meta = tiny_model_on_meta()
    assert TreeKVCache.for_model(meta, 8).device.type == "meta"
    assert cache.layers[0].get_mask_sizes(2) == (5, 0)  # transformers' own masks: 3 cached + 2 new keys, from 0


def tiny_model_on_meta():
    from tiny import tiny_model

    return tiny_model().to("meta")


def test_slot_cache_keeps_dtype_and_device_and_refuses_overflow():
    import types

    import pytest

    from draftheads.kvcache import SlotKVCache, TreeKVCache

    for device in ("cpu", "meta"):
        cache = SlotKVCache(2, 3, 8, 2, 4, torch.bfloat16, device)
        for t in (cache.kv, cache.lengths, cache._rows, cache._cols):
            assert t.device.type == device
        assert cache.kv.dtype == torch.bfloat16 and cache.lengths.dtype == torch.long
    meta = tiny_model_on_meta()
    cache = SlotKVCache.for_model(meta, 2, 8)
    assert cache.kv.device.type == "meta" and cache.kv.shape == (2, 2, 2, 2, 8, 16)  # tiny: 4 heads of 16, 2 kv heads
    cfg = types.SimpleNamespace(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, head_dim=8)
    cache = SlotKVCache.for_model(types.SimpleNamespace(config=cfg, parameters=lambda: iter([torch.zeros(1)])), 2, 8)
    assert cache.kv.shape == (1, 2, 2, 4, 8, 8)  # head_dim as the config says; no num_key_value_heads: one per head

    cache = SlotKVCache(1, 2, 6, 1, 2, torch.bfloat16, "cpu")
    pre = TreeKVCache(1, 6, torch.bfloat16, "cpu")
    pre.append(0, torch.ones(1, 1, 5, 2, dtype=torch.bfloat16), torch.ones(1, 1, 5, 2, dtype=torch.bfloat16))
    cache.load(0, pre)  # 5 of 6: one token can still be generated
    assert cache.step_mask().dtype == torch.bfloat16
    m = cache.tree_mask(torch.zeros(2, 1, 1, dtype=torch.float32))  # 5 + 1 = capacity: fits
    assert m.dtype == torch.bfloat16 and m.shape == (2, 1, 1, 6)
    with pytest.raises(AssertionError, match="^KV cache overflow$"):
        cache.tree_mask(torch.zeros(2, 2, 2))  # 5 + 2 > 6
    with pytest.raises(AssertionError, match="^KV cache overflow$"):
        cache.tree_mask(torch.zeros(3, 1, 1))  # more rows than slots
    cache.lengths[0] = 6
    with pytest.raises(AssertionError, match="^KV cache overflow: a slot outgrew its capacity$"):
        cache.step_mask()
    pre.append(0, torch.ones(1, 1, 1, 2, dtype=torch.bfloat16), torch.ones(1, 1, 1, 2, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match="^the prompt fills the slot: nothing could be generated$"):
        cache.load(1, pre)  # 6 of 6


# ---------------------------------------------------------------- training data

def test_split_is_seeded_and_bounded():
    from draftheads.train.data import split

    assert split(1, 0.5, 0) == ([0], [])
    assert split(10, 0.0, 0) == (list(range(10)), [])
    for n, frac, n_eval in ((2, 0.1, 1), (3, 0.01, 1), (10, 0.25, 2), (10, 0.95, 9), (10, 1.0, 9)):
        train, held = split(n, frac, 7)
        assert len(held) == n_eval and sorted(train + held) == list(range(n)), (n, frac)
    assert split(20, 0.3, 1) == split(20, 0.3, 1) and split(20, 0.3, 1) != split(20, 0.3, 2)


def test_records_conversations_and_stored_token_streams(tmp_path):
    import json

    import pytest

    from draftheads.errors import UserError
    from draftheads.train.data import load_training_data, read_conversations, read_records

    good = {"messages": [{"role": "user", "content": "é"}, {"role": "assistant", "content": "ü"}]}
    lines = [json.dumps({"messages": [{"role": "user", "content": "q"}]}),  # no answer
             '{"torn": ', "", json.dumps([1, 2]),  # a torn line, a blank, not a dict: skipped, reading goes on
             json.dumps({"messages": [{"role": "assistant", "content": ""}]}),  # empty answer
             json.dumps({"messages": []}),
             json.dumps({"messages": [{"role": "user", "content": "x"}, {"content": "y"}]}),
             json.dumps(good, ensure_ascii=False),
             json.dumps({"messages": good["messages"], "ids": [5, 6, 7, 8, 9], "prompt_len": 2})]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(read_records(f)) == 6
    assert read_conversations(f) == [good["messages"], good["messages"]]
    from tiny import tiny_tokenizer

    seqs, hidden = load_training_data(f, tiny_tokenizer(), 4)
    assert len(seqs) == 2 and seqs[0][0].shape == seqs[0][1].shape == (4,)  # rendered, cut to max_length
    (ids, mask), = seqs[1:]
    assert ids.dtype == torch.long and ids.tolist() == [5, 6, 7, 8] and mask.tolist() == [False, False, True, True]
    assert hidden == [None, None]
    (tmp_path / "none.jsonl").write_text(lines[0] + "\n")
    for fn in (read_conversations, lambda p: load_training_data(p, tiny_tokenizer(), 8)):
        with pytest.raises(UserError, match=r"none.jsonl: no conversations with an assistant turn \(expected JSONL"):
            fn(tmp_path / "none.jsonl")


def test_tokenize_conversation_edges():
    import pytest

    from tiny import tiny_tokenizer

    from draftheads.errors import UserError
    from draftheads.train.data import tokenize_conversation

    tok = tiny_tokenizer()
    conv = [{"role": "assistant", "content": "hi"}]  # an opening assistant turn: all of it is the answer
    ids, mask = tokenize_conversation(tok, conv, 64)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and bool(mask.all())
    assert tok.decode(ids) == "<|im_start|>assistant\nhi<|im_end|>\n"

    class Drifting:
        """A template that re-renders earlier turns once the conversation grows past two messages."""

        def apply_chat_template(self, msgs, add_generation_prompt=False, tokenize=True):
            return ("P" if len(msgs) > 2 else "") + "".join(m["content"] for m in msgs)

    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(UserError, match="^the chat template does not render conversations incrementally; "
                                        "cannot mask assistant turns$"):
        tokenize_conversation(Drifting(), conv, 64)


def test_vocab_trim_counts_are_integers_and_bad_sizes_are_refused():
    import pytest

    from draftheads.heads.vocab import build_vocab_map, count_tokens

    counts = count_tokens([(torch.tensor([1, 1, 2]), torch.tensor([True, True, False]))], 4)
    assert counts.dtype == torch.long and counts.tolist() == [0, 2, 0, 0]
    with pytest.raises(AssertionError):
        build_vocab_map(torch.ones(4, dtype=torch.long), 0)
    with pytest.raises(AssertionError):
        build_vocab_map(torch.ones(2, 4, dtype=torch.long), 1)


def test_lr_factor_warms_up_linearly_then_follows_a_cosine_to_zero():
    import math

    from draftheads.train.trainer import lr_factor

    assert [lr_factor(s, 20, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 20, 4) == 1.0 and lr_factor(12, 20, 4) == pytest_approx(0.5)
    assert lr_factor(8, 20, 4) == pytest_approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(20, 20, 4) == pytest_approx(0.0) and lr_factor(30, 20, 4) == pytest_approx(0.0)
    assert lr_factor(0, 10, 0) == 1.0 and lr_factor(5, 10, 0) == pytest_approx(0.5)
    assert lr_factor(1, 1, 0) == pytest_approx(0.0)  # one step of cosine: done after it


def pytest_approx(x):
    import pytest

    return pytest.approx(x, abs=1e-12)


def test_loss_skips_a_head_without_targets_but_not_the_heads_after_it():
    K, N, V = 3, 4, 5
    logits = torch.randn(K, N, V, generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, V, (N, K), generator=torch.Generator().manual_seed(3))
    targets[:, 1] = IGNORE
    loss, per_head = medusa_loss(logits, targets, 0.5)
    ce = [torch.nn.functional.cross_entropy(logits[k], targets[:, k]) for k in (0, 2)]
    torch.testing.assert_close(per_head, torch.stack([ce[0], torch.tensor(0.0), ce[1]]))
    torch.testing.assert_close(loss, ce[0] + 0.25 * ce[1])


def test_flat_positions_are_global_over_several_sequences_and_devices_follow():
    from draftheads.train.trainer import path_tokens

    seqs = [(torch.arange(n), torch.ones(n, dtype=torch.bool)) for n in (5, 4, 6)]
    pos, tgt = flat_examples(seqs, 1)
    assert pos.tolist() == [0, 1, 2, 5, 6, 9, 10, 11, 12]
    flat = torch.cat([s[0] for s in seqs])
    assert torch.equal(flat[pos + 2], tgt[:, 0])
    meta = torch.zeros(4, dtype=torch.long, device="meta")
    assert path_tokens(meta, meta, 2).device.type == "meta"
    assert next_hidden(torch.zeros(4, 3, device="meta"), meta, 2).device.type == "meta"


def test_distilled_directory_conversations_shards_and_fingerprint(tmp_path, capsys):
    import json

    import pytest

    from draftheads.errors import UserError
    from draftheads.train.data import load_training_data, read_conversations
    from draftheads.train.shards import ShardWriter

    def rec(i, answered=True):
        msgs = [{"role": "user", "content": f"q{i}"}] + ([{"role": "assistant", "content": f"a{i}"}] if answered else [])
        return {"messages": msgs, "ids": list(range(10 * i, 10 * i + 4)), "prompt_len": 1, "source": "t"}

    d = tmp_path / "dist"
    w = ShardWriter(d, 2, {"backbone_fingerprint": "fp-a", "hidden_size": 3})
    hid = [torch.full((4, 3), float(i)) for i in range(5)]
    for i in (0, 2, 4):  # shards 0 and 1 of two records each, then a partial one
        w.append([rec(j, answered=j != 1) for j in range(i, min(i + 2, 5))], hid[i:i + 2])
    w.close(finish=False)
    assert [m[0]["content"] for m in read_conversations(d)] == ["q0", "q2", "q3", "q4"]
    seqs, hidden = load_training_data(d, None, 3, fingerprint="fp-a")
    assert [s[0].tolist() for s in seqs] == [[0, 1, 2], [20, 21, 22], [30, 31, 32], [40, 41, 42]]
    assert [s[1].tolist() for s in seqs] == [[False, True, True]] * 4
    assert [h[0, 0].item() for h in hidden] == [0.0, 2.0, 3.0, 4.0] and hidden[0].shape == (3, 3)
    seqs, hidden = load_training_data(d, None, 8, shards=1)  # the first finished shard only, never the partial one
    assert [s[0].tolist() for s in seqs] == [[0, 1, 2, 3]] and len(hidden) == 1
    seqs, _ = load_training_data(d, None, 8, shards=2)
    assert [s[0][0].item() for s in seqs] == [0, 20, 30]
    with pytest.raises(UserError, match=r"^.*dist was distilled from another backbone \(output-embedding fingerprint "
                                        r"fp-a, this one fp-b\): distil again with this backbone$"):
        load_training_data(d, None, 8, fingerprint="fp-b")
    (d / "features" / "shard-00001.safetensors").unlink()  # features are a local cache: computed when asked
    calls = []

    def hidden_of(seqs):
        calls.append(len(seqs))
        return [torch.full((len(s), 3), float(s[0] // 10)) for s in seqs]

    seqs, hidden = load_training_data(d, None, 8, fill=(hidden_of, False))
    assert calls and [h[0, 0].item() for h in hidden] == [0.0, 2.0, 3.0, 4.0]
    assert capsys.readouterr().err == ""  # progress=False: no bar
    (d / "manifest.json").unlink()  # a directory without a manifest: nothing to compare, still readable
    assert len(load_training_data(d, None, 8, fingerprint="fp-b")[0]) == 4


def test_segments_are_tokenised_without_special_tokens():
    from tiny import tiny_tokenizer

    from draftheads.train.data import tokenize_conversation

    class WithBos:
        """The tiny tokenizer plus a BOS token (id 0) whenever special tokens are asked for, as Llama's adds."""

        def __init__(self):
            self.tok = tiny_tokenizer()

        def apply_chat_template(self, *a, **k):
            return self.tok.apply_chat_template(*a, **k)

        def __call__(self, text, add_special_tokens=True):
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([0] if add_special_tokens else []) + ids}

    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ids, mask = tokenize_conversation(WithBos(), conv, 64)
    want, _ = tokenize_conversation(tiny_tokenizer(), conv, 64)
    assert ids.tolist() == want.tolist() and 0 not in ids.tolist()


def test_data_assertions_refuse_what_they_name():
    import pytest

    from draftheads.train.data import tokenize_conversation

    with pytest.raises(AssertionError, match="^empty conversation$"):
        tokenize_conversation(None, [], 8)
    with pytest.raises(AssertionError):
        head_targets(torch.arange(4), torch.ones(3, dtype=torch.bool), 2)  # ids and mask of other lengths
