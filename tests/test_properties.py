"""Property-based tests (hypothesis) where hand-picked examples are thin: random trees, random logits,
random vocabulary maps and token streams, each checked against a slow reference written out here."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from draftheads.acceptance import SamplingConfig, accept_exact, accept_greedy, accept_typical, sampling_probs
from draftheads.heads.vocab import IGNORE, build_vocab_map, count_tokens, full_to_trimmed, trim_targets
from draftheads.train.data import head_targets
from draftheads.tree import Tree

FAST = settings(max_examples=40, deadline=None)


@st.composite
def trees(draw, max_nodes=12, max_rank=4, max_depth=4):
    """A random valid ranked tree: every path's parent is in it."""
    paths = set()
    for _ in range(draw(st.integers(0, max_nodes))):
        parent = draw(st.sampled_from(sorted([()] + [p for p in paths if len(p) < max_depth])))
        paths.add(parent + (draw(st.integers(0, max_rank - 1)),))
    order = draw(st.permutations(sorted(paths)))  # the constructor must not depend on the listed order
    return Tree([list(p) for p in order], max_rank=max_rank)


def _ancestors(tree, node):
    """Slow reference: nodes whose path is a prefix of node's path (the root's path is empty)."""
    path = tree.paths[node - 1] if node else ()
    return {0} | {j for j in range(1, tree.size) if path[:len(tree.paths[j - 1])] == tree.paths[j - 1]}


@FAST
@given(trees())
def test_tree_mask_lets_a_node_see_exactly_its_ancestors(tree):
    t = tree.tensors("cpu", torch.float32)
    visible = t.tree_bias == 0
    for i in range(tree.size):
        assert set(visible[i].nonzero().flatten().tolist()) == _ancestors(tree, i)
        assert tree.path_to(i) == sorted(_ancestors(tree, i), key=lambda j: len(tree.paths[j - 1]) if j else 0)
    assert torch.all(t.tree_bias[~visible] == torch.finfo(torch.float32).min)
    assert t.depths.tolist() == [0] + [len(p) for p in tree.paths]
    assert t.head_of.tolist() == [len(p) - 1 for p in tree.paths]
    assert t.rank_of.tolist() == [p[-1] for p in tree.paths]


@FAST
@given(trees())
def test_tree_order_parents_children_and_levels(tree):
    assert tree.paths == sorted(tree.paths, key=lambda p: (len(p), p))
    assert all(tree.index[p] == i + 1 for i, p in enumerate(tree.paths))
    for i in range(1, tree.size):
        p = tree.paths[i - 1]
        assert tree.parent[i] == (tree.index[p[:-1]] if len(p) > 1 else 0)
        assert tree.parent[i] < i  # parents come first: one forward pass in node order is causal
        assert i in tree.children[tree.parent[i]]
    assert sum(len(c) for c in tree.children) == tree.size - 1
    assert tree.depth == max((len(p) for p in tree.paths), default=0)
    if tree.paths:
        assert tree.topk == 1 + max(max(p) for p in tree.paths)
    levels = tree.levels("cpu")
    assert len(levels) == tree.depth
    for d, lv in enumerate(levels, start=1):
        nodes = lv.nodes.tolist()
        assert nodes == [i for i in range(1, tree.size) if len(tree.paths[i - 1]) == d]
        for n, row, rank in zip(nodes, lv.parent_pos.tolist(), lv.ranks.tolist()):
            assert lv.parent_paths[row].tolist() == tree.path_to(tree.parent[n])
            assert rank == tree.paths[n - 1][-1]
        assert lv.topk == 1 + max(lv.ranks.tolist())


def _ref_walk(tree, cands, choose):
    node, nodes = 0, [0]
    while True:
        token = choose(node)
        kids = [c for c in range(1, tree.size) if tree.parent[c] == node and cands[c] == token]
        if not kids:
            return nodes, token
        node = kids[0]
        nodes.append(node)


@st.composite
def verify_inputs(draw):
    tree = draw(trees(max_nodes=8, max_rank=3))
    vocab = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # Peaked logits so that drafts are often accepted, and candidates mostly the likely tokens.
    logits = torch.randn(tree.size, vocab, generator=g) * draw(st.sampled_from([0.5, 3.0, 8.0]))
    cands = torch.randint(0, vocab, (tree.size,), generator=g)
    return tree, logits, cands, seed


def _check_path(tree, cands, nodes, token):
    assert nodes[0] == 0
    for a, b in zip(nodes, nodes[1:]):
        assert tree.parent[b] == a
    assert all(cands[c] != token for c in tree.children[nodes[-1]])


@FAST
@given(verify_inputs())
def test_greedy_acceptance_matches_a_slow_reference(inp):
    tree, logits, cands, _ = inp
    nodes, token = accept_greedy(logits, cands, tree)
    assert (nodes, token) == _ref_walk(tree, cands.tolist(), lambda n: int(logits[n].argmax()))
    _check_path(tree, cands.tolist(), nodes, token)


@FAST
@given(verify_inputs(), st.sampled_from([0.4, 1.0, 1.8]), st.sampled_from([0, 2]), st.sampled_from([1.0, 0.7]))
def test_exact_acceptance_draws_like_the_reference(inp, temperature, top_k, top_p):
    """The exact rule's walk consumes the generator exactly as one backbone draw per visited node."""
    tree, logits, cands, seed = inp
    sp = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, acceptance="exact")
    nodes, token = accept_exact(logits, cands, tree, sp, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    x = logits.double() / temperature
    if top_k:
        x = x.masked_fill(x < x.topk(min(top_k, x.shape[-1]), -1).values[:, -1:], float("-inf"))
    probs = x.softmax(-1).float()
    if top_p == 1.0:  # top-p is pinned against transformers' warpers in test_acceptance
        torch.testing.assert_close(sampling_probs(logits, sp), probs)
    ref = _ref_walk(tree, cands.tolist(), lambda n: int(torch.multinomial(sampling_probs(logits[n], sp), 1, generator=g)))
    assert (nodes, token) == ref
    _check_path(tree, cands.tolist(), nodes, token)


@FAST
@given(verify_inputs(), st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([(0.09, 0.3), (0.3, 0.9), (0.02, 0.05)]))
def test_typical_acceptance_matches_a_slow_reference(inp, temperature, eps_delta):
    tree, logits, cands, seed = inp
    eps, delta = eps_delta
    sp = SamplingConfig(temperature=temperature, acceptance="typical", typical_epsilon=eps, typical_delta=delta)
    nodes, token = accept_typical(logits, cands, tree, sp, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    c = cands.tolist()

    def choose(n):
        kids = tree.children[n]
        p = (logits[n].float() / temperature).softmax(-1)
        if kids:
            h = -(p * (p + 1e-5).log()).sum()
            threshold = min(eps, delta * float(torch.exp(-h)))
            best = max(kids, key=lambda k: (float(p[c[k]]), -k))
            if float(p[c[best]]) > threshold:
                return c[best]
        return int(torch.multinomial(sampling_probs(logits[n], sp), 1, generator=g))

    assert (nodes, token) == _ref_walk(tree, c, choose)
    _check_path(tree, c, nodes, token)


# ---------------------------------------------------------------- VocabTrim and targets

@st.composite
def vocab_maps(draw):
    v = draw(st.integers(2, 40))
    counts = torch.tensor(draw(st.lists(st.integers(0, 5), min_size=v, max_size=v)))
    n = draw(st.integers(1, v))
    always = draw(st.lists(st.integers(0, v - 1), max_size=min(n, 2), unique=True))
    return counts, n, always


@FAST
@given(vocab_maps())
def test_vocab_map_is_the_top_n_by_count_lower_ids_first(inp):
    counts, n, always = inp
    vmap = build_vocab_map(counts, n, always)
    rest = sorted((t for t in range(len(counts)) if t not in always), key=lambda t: (-int(counts[t]), t))
    assert vmap.tolist() == sorted(list(always) + rest[:n - len(always)])


@FAST
@given(vocab_maps(), st.data())
def test_vocab_trim_maps_round_trip(inp, data):
    counts, n, always = inp
    v = len(counts)
    vmap = build_vocab_map(counts, n, always)
    table = full_to_trimmed(vmap, v)
    assert torch.equal(table[vmap], torch.arange(n))
    assert int((table == IGNORE).sum()) == v - n
    targets = torch.tensor(data.draw(st.lists(st.sampled_from([IGNORE] + list(range(v))), min_size=1, max_size=30)))
    before = targets.clone()
    trimmed = trim_targets(targets, table)
    assert torch.equal(targets, before)  # not modified in place
    kept = torch.isin(targets, vmap)
    assert torch.equal(trimmed == IGNORE, ~kept)
    assert torch.equal(vmap[trimmed[kept]], targets[kept])


@FAST
@given(st.lists(st.tuples(st.lists(st.integers(0, 9), max_size=12), st.integers(0, 12)), max_size=4))
def test_count_tokens_counts_masked_positions(seqs):
    pairs, want = [], [0] * 10
    for ids, start in seqs:
        mask = [i >= start for i in range(len(ids))]
        pairs.append((torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)))
        for t, m in zip(ids, mask):
            want[t] += m
    assert count_tokens(pairs, 10).tolist() == want


@FAST
@given(st.lists(st.integers(0, 50), max_size=15), st.integers(0, 15), st.integers(1, 4))
def test_head_targets_match_a_slow_reference(ids, prompt_len, k):
    t = torch.tensor(ids, dtype=torch.long)
    mask = torch.arange(len(ids)) >= prompt_len
    out = head_targets(t, mask, k)
    assert out.shape == (len(ids), k)
    for pos in range(len(ids)):
        for h in range(k):
            j = pos + 2 + h
            assert int(out[pos, h]) == (ids[j] if j < len(ids) and j >= prompt_len else IGNORE)


# ---------------------------------------------------------------- KV cache compaction and masks

@FAST
@given(trees(max_nodes=8, max_rank=3), st.integers(0, 5), st.data())
def test_cache_keeps_exactly_the_accepted_path(tree, prefix, data):
    """Prefill `prefix` entries, append one entry per tree node, keep a random root-down path: the cache
    holds the prefix then the path's entries in order, on every layer, keys and values alike."""
    from draftheads.kvcache import TreeKVCache

    layers, n = 2, tree.size
    cache = TreeKVCache(layers, prefix + n + 2, torch.float32, "cpu")
    kv = torch.randn(layers, 2, 1, 2, prefix + n, 3)
    leaf = data.draw(st.integers(0, n - 1))
    path = tree.path_to(leaf)
    mask = cache.attention_mask(tree.tensors("cpu", torch.float32).tree_bias) if prefix == 0 else None
    for layer in range(layers):
        if prefix:
            cache.append(layer, kv[layer, 0, ..., :prefix, :], kv[layer, 1, ..., :prefix, :])
    if prefix:
        assert cache.length == prefix
        mask = cache.attention_mask(tree.tensors("cpu", torch.float32).tree_bias)
    # The mask: the whole prefix visible to every node, the nodes as the tree says.
    assert mask.shape == (1, 1, n, prefix + n)
    assert torch.all(mask[0, 0, :, :prefix] == 0)
    assert torch.equal(mask[0, 0, :, prefix:], tree.tensors("cpu", torch.float32).tree_bias)
    for layer in range(layers):
        k, v = cache.append(layer, kv[layer, 0, ..., prefix:, :], kv[layer, 1, ..., prefix:, :])
        assert torch.equal(k, kv[layer, 0, ..., :prefix + n, :]) and torch.equal(v, kv[layer, 1, ..., :prefix + n, :])
    cache.keep(path, prefix)
    assert cache.length == prefix + len(path)
    want = torch.cat([kv[..., :prefix, :], kv[..., [prefix + i for i in path], :]], dim=-2)
    assert torch.equal(cache.kv[..., :prefix + len(path), :], want)
    # The next step's mask sees the kept entries and nothing stale.
    nxt = cache.attention_mask(torch.zeros(1, 1))
    assert nxt.shape == (1, 1, 1, prefix + len(path) + 1) and torch.all(nxt == 0)


@FAST
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), trees(max_nodes=5, max_rank=2), st.data())
def test_slot_cache_keeps_each_slots_sequence(prefills, tree, data):
    """Slots loaded with prompts of different lengths, one plain step, then one tree step with a random
    accepted path per slot: each slot's entries are its own prompt, step and path, in order; masks show
    each slot exactly its own entries (and a node its tree ancestors)."""
    from draftheads.kvcache import SlotKVCache, TreeKVCache

    S, q, cap = len(prefills), tree.size, 16
    cache = SlotKVCache(2, S, cap, 1, 2, torch.float32, "cpu")
    want = []
    for s, n in enumerate(prefills):
        pre = TreeKVCache(2, cap, torch.float32, "cpu")
        kv = torch.randn(2, 2, 1, 1, n, 2)
        for layer in range(2):
            pre.append(layer, kv[layer, 0], kv[layer, 1])
        cache.load(s, pre)
        want.append([kv[:, :, 0, :, i] for i in range(n)])  # entries [layers, 2, kv_heads, head_dim]
    assert cache.lengths.tolist() == prefills
    mask = cache.step_mask()[:, 0, 0]  # [S, max + 1]
    assert mask.shape == (S, max(prefills) + 1)
    for s, n in enumerate(prefills):
        assert torch.all(mask[s, :n + 1] == 0) and torch.all(mask[s, n + 1:] < -1e30)
    step = torch.randn(2, 2, S, 1, 1, 2)
    for layer in range(2):
        k, v = cache.append(layer, step[layer, 0], step[layer, 1])
        assert k.shape == (S, 1, max(prefills) + 1, 2)
    cache.advance()
    for s in range(S):
        want[s].append(step[:, :, s, :, 0])
    bias = tree.tensors("cpu", torch.float32).tree_bias
    tmask = cache.tree_mask(bias.expand(S, q, q))[:, 0]  # [S, q, max + q]
    nodes = torch.randn(2, 2, S, 1, q, 2)
    for layer in range(2):
        cache.append(layer, nodes[layer, 0], nodes[layer, 1])
    for s in range(S):
        L = prefills[s] + 1
        assert torch.all(tmask[s, :, :L] == 0) and torch.equal(tmask[s, :, L:L + q], bias)
        assert torch.all(tmask[s, :, L + q:] < -1e30)
        path = tree.path_to(data.draw(st.integers(0, q - 1)))
        cache.keep(s, path)
        want[s] += [nodes[:, :, s, :, i] for i in path]
    for s in range(S):
        assert int(cache.lengths[s]) == len(want[s])
        assert torch.equal(cache.kv[:, :, s, :, :len(want[s])], torch.stack(want[s], dim=3))
    cache.release(0)
    assert int(cache.lengths[0]) == 0
