"""Hydra and Hydra++ heads: lossless in the loop, drafts that depend on the path, depth-by-depth
bookkeeping, the prefix layer's cache, and the native format."""

import pytest
import torch
from test_loop import decoder_on, hf_greedy, run
from tiny import tiny_heads, tiny_hydra_heads, tiny_model

from draftheads.acceptance import SamplingConfig
from draftheads.generate import Stats
from draftheads.heads import HydraHeads, load_heads, save_heads
from draftheads.tree import load_tree


@pytest.mark.parametrize("head_type,residual,token", [("hydra", "projection", False), ("hydra++", "projection", False),
                                                       ("hydra++", "hidden", False), ("hydra++", "hidden", True)])
@pytest.mark.parametrize("arch,path", [("llama", "lean"), ("qwen2", "lean"), ("mistral", "generic")])
@pytest.mark.filterwarnings("error::FutureWarning")  # the cache goes by the keyword the model's forward names
def test_greedy_with_hydra_equals_plain_greedy(head_type, residual, token, arch, path):
    model = tiny_model(arch)
    heads = tiny_hydra_heads(model, head_type, grounded_residual=residual, prefix_token=token)
    prompt = torch.randint(0, 200, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    stats = Stats()
    assert run(decoder_on(path, model, heads, load_tree("medusa16", 3)), prompt, stats=stats) == hf_greedy(model, prompt)
    assert stats.steps < 48  # some drafts were accepted


def test_on_a_plain_tree_the_heads_are_not_run_and_the_lookup_still_drafts(monkeypatch):
    """A plain tree (calibrate may choose it beside prompt lookup) drafts nothing from the heads: Hydra++'s prefix layer,
    which would follow every accepted token, is not run, the lookup's branches are, and the output is plain greedy's.
    A tree named for one call still gets the heads, whose state then starts with that call."""
    from draftheads.generate import Decoder
    from draftheads.lookup import LookupConfig, PromptLookup

    model = tiny_model()
    heads = tiny_hydra_heads(model, "hydra++")
    observed = []
    observe = heads.observe
    monkeypatch.setattr(heads, "observe", lambda h, ids: (observed.append(len(ids)), observe(h, ids))[1])
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    want = hf_greedy(model, prompt)
    stats = Stats()
    assert run(Decoder(model, heads, load_tree([], 3), PromptLookup(LookupConfig())), prompt, stats=stats) == want
    assert observed == [] and stats.nodes > stats.steps  # branches were verified
    assert run(Decoder(model, heads, load_tree([], 3)), prompt) == want and observed == []
    assert run(Decoder(model, heads, load_tree([], 3)), prompt, tree=load_tree("chain2", 3)) == want
    assert observed[0] == len(prompt)  # the prefill's positions, then each step's accepted ones


@pytest.mark.parametrize("head_type,token", [("hydra", False), ("hydra++", False), ("hydra++", True)])
def test_a_cut_hydra_loop_equals_plain_greedy_and_its_prefix_layer_follows(head_type, token, kv_float32):
    """The loop with a cut for one sequence (min_prob): fewer nodes verified than the tree has, greedy output
    unchanged, and Hydra++'s prefix layer after it still the layer over the accepted sequence."""
    model = tiny_model()
    heads = tiny_hydra_heads(model, head_type, grounded_residual="hidden" if token else "projection",
                             prefix_token=token, noise=0.3)
    prompt = torch.randint(0, 200, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    tree = load_tree("chain3")
    whole, cut = Stats(), Stats()
    assert run(decoder_on("lean", model, heads, tree), prompt, n=30, stats=whole) == hf_greedy(model, prompt, 30)
    dec = decoder_on("lean", model, heads, tree)
    dec.min_prob = 0.05
    out = []
    for step in dec.steps(prompt, 30, SamplingConfig(), cut, None):
        out += step  # whole steps, as in the prefix-layer tests
    assert out[:30] == hf_greedy(model, prompt, 30)
    assert cut.steps < cut.nodes < whole.nodes * cut.steps / whole.steps  # some nodes kept, some cut
    if head_type == "hydra++":
        seq = torch.tensor(prompt + out)
        seen = heads._cache.length
        assert seen == len(seq) - (2 if token else 1)
        hidden = model.base_model(input_ids=seq[None]).last_hidden_state  # [1, T, H]
        if token:
            with torch.inference_mode():
                heads.draft(hidden[0, seen], seq[seen + 1], tree)  # the waiting position joins with its root
        ahead = seq[None, 1:seen + 2] if token else None
        fresh = heads.prefix_states(hidden[:, :seen + (1 if token else 0)], None, ahead)[0, -1]
        torch.testing.assert_close(heads._last, fresh, atol=1e-4, rtol=1e-4)


def test_hydra_draft_confident_keeps_paths_by_probability_and_runs_no_head_below_a_level_it_cut():
    model = tiny_model()
    heads = tiny_hydra_heads(model, num_heads=3, noise=0.3)
    h, root, tree = torch.randn(64), torch.tensor(7), load_tree("chain3")
    ids = heads.draft(h, root, tree)
    path, probs = [root], []
    for k in range(3):
        logits = heads.head(k, h[None], torch.stack(path)[None])[0]  # [vocab]
        probs.append(float(logits.softmax(-1)[ids[k + 1]]))
        path.append(ids[k + 1])
    along = [probs[0], probs[0] * probs[1], probs[0] * probs[1] * probs[2]]
    for c in (along[1] * 0.999, along[1] * 1.001):
        (cut, kept), = heads.draft_confident(h[None], root.view(1), tree, c)
        n = sum(p >= c for p in along)
        assert cut.size == 1 + n and torch.equal(kept, ids[:1 + n])
    calls = []
    real = heads.head
    heads.head = lambda k, *a: calls.append(k) or real(k, *a)
    (cut, kept), = heads.draft_confident(h[None], root.view(1), tree, min(along[0] * 1.001, 0.999))
    assert cut.size == 1 and calls == [0]  # the first node cut: heads 2 and 3 never ran


def test_hydra_teacher_probabilities_are_the_heads_own_along_the_true_path():
    """What calibrate predicts a cut from (teacher_top_probs): each head's top ids as teacher_topk gives them,
    and their softmax probabilities as draft_confident computes them on that path."""
    model = tiny_model()
    heads = tiny_hydra_heads(model, "hydra++", num_heads=3, noise=0.3)
    ids = torch.randint(0, 200, (20,), generator=torch.Generator().manual_seed(0))
    hidden = model.base_model(input_ids=ids[None]).last_hidden_state[0]  # [T, H]
    top, probs = heads.teacher_top_probs(hidden, ids, 10)  # [K, T, 10] each
    assert torch.equal(top, heads.teacher_topk(hidden, ids, 10))
    t = 9
    heads.reset()
    heads.observe(hidden[:t + 1])
    for k in range(3):
        logits = heads.head(k, heads._last[None], ids[t + 1:t + 2 + k][None])[0]
        torch.testing.assert_close(probs[k, t], logits.softmax(-1)[top[k, t]], rtol=1e-5, atol=1e-6)


def test_hydra_drafts_depend_on_the_path_and_medusa_drafts_do_not():
    model = tiny_model()
    hidden, tree = torch.randn(64), load_tree("chain3")
    hydra = tiny_hydra_heads(model, noise=0.3)
    a, b = hydra.draft(hidden, torch.tensor(5), tree), hydra.draft(hidden, torch.tensor(9), tree)
    assert a[1] != b[1] or a[2] != b[2]  # head 0 sees the root: another root, another guess
    medusa = tiny_heads(model, noise=0.3)
    a, b = medusa.draft(hidden, torch.tensor(5), tree), medusa.draft(hidden, torch.tensor(9), tree)
    assert torch.equal(a[1:], b[1:])


@pytest.mark.parametrize("tree", ["medusa16", "medusa63"])
def test_depth_by_depth_drafts_are_each_heads_topk_given_the_parent_path(tree):
    model = tiny_model()
    heads = tiny_hydra_heads(model, num_heads=4, noise=0.3)
    t = load_tree(tree, 4)
    h = torch.randn(64)
    ids = heads.draft(h, torch.tensor(3), t)
    for node in range(1, t.size):
        path = t.path_to(node)  # root .. node
        depth, rank = len(path) - 1, t.paths[node - 1][-1]
        logits = heads.head(depth - 1, h[None], ids[path[:-1]][None])  # [1, vocab]
        assert ids[node] == logits.topk(rank + 1, dim=-1).indices[0, rank], (node, t.paths[node - 1])


def test_teacher_topk_matches_drafting_along_the_true_path():
    model = tiny_model()
    heads = tiny_hydra_heads(model, "hydra++", num_heads=3, noise=0.3)
    ids = torch.randint(0, 200, (20,), generator=torch.Generator().manual_seed(0))
    hidden = model.base_model(input_ids=ids[None]).last_hidden_state[0]  # [T, H]
    top = heads.teacher_topk(hidden, ids, 10)  # [K, T, 10]
    t = 9
    heads.reset()
    heads.observe(hidden[:t + 1])
    chain = load_tree("chain3")
    # Drafting the chain whose path is the true tokens: force it by checking each depth separately.
    for k in range(3):
        logits = heads.head(k, heads._last[None], ids[t + 1:t + 2 + k][None])
        assert torch.equal(logits.topk(10, dim=-1).indices[0], top[k, t])
    assert heads.draft(hidden[t], ids[t + 1], chain)[1] == top[0, t, 0]


def test_prefix_layer_cache_after_acceptance_equals_recomputation(kv_float32):
    model = tiny_model()
    heads = tiny_hydra_heads(model, "hydra++")
    prompt = torch.randint(0, 200, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    out = run(decoder_on("lean", model, heads, load_tree("medusa16", 3)), prompt, n=30)
    # The decoder consumed 30 tokens' worth of steps; the prefix layer saw exactly the accepted positions.
    seen = heads._cache.length
    seq = torch.tensor(prompt + out)[:seen]
    hidden = model.base_model(input_ids=seq[None]).last_hidden_state  # [1, seen, H]
    fresh = heads.prefix_states(hidden)[0, -1]
    assert seen >= len(prompt) + 20
    torch.testing.assert_close(heads._last, fresh, atol=1e-4, rtol=1e-4)


def test_token_prefix_cache_after_acceptance_equals_recomputation(kv_float32):
    """prefix_token: each position's input pairs its hidden state with the next token; the last accepted
    position waits for the root, which draft adds. After decoding (steps with and without a tree), the
    prefix layer's cache and its output at the last position equal the layer over the whole sequence."""
    from draftheads.lookup import Hybrid

    model = tiny_model()
    heads = tiny_hydra_heads(model, "hydra++", grounded_residual="hidden", prefix_token=True, noise=0.3)
    prompt = torch.randint(0, 200, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    dec = decoder_on("lean", model, heads, load_tree("medusa16", 3))
    out = []
    for step in dec.steps(prompt, 30, SamplingConfig(), Stats(), None):
        out += step  # whole steps: the last root is the token after the waiting position
    seq = torch.tensor(prompt + out)
    seen = heads._cache.length  # the accepted positions but the last, which waits for its root
    assert seen == len(seq) - 2 and heads._last is None and seen >= len(prompt) + 20
    hidden = model.base_model(input_ids=seq[None]).last_hidden_state  # [1, T, H]
    with torch.inference_mode():  # the decoder made the cache in inference mode
        heads.draft(hidden[0, seen], seq[seen + 1], load_tree("chain3"))
    fresh = heads.prefix_states(hidden[:, :seen + 1], None, seq[None, 1:seen + 2])[0, -1]
    torch.testing.assert_close(heads._last, fresh, atol=1e-4, rtol=1e-4)
    # A step without a tree (no draft): observe adds the waiting position with the ids it is given.
    drafter = Hybrid(heads)
    drafter.reset()
    drafter.observe(hidden[0, :5], seq[:5])
    drafter.observe(hidden[0, 5:7], seq[5:7])  # no draft in between: position 4 takes seq[5] here
    assert heads._cache.length == 6 and heads._last is None
    ids = heads.draft(hidden[0, 6], seq[7], load_tree("chain3"))
    torch.testing.assert_close(heads._last, heads.prefix_states(hidden[:, :7], None, seq[None, 1:8])[0, -1],
                               atol=1e-4, rtol=1e-4)
    assert ids[0] == seq[7] and heads._cache.length == 7


def test_token_prefix_drafts_see_the_root_through_the_prefix_layer():
    """With prefix_token the first head's input changes with the root twice (the path and the prefix
    layer's last position); teacher_topk agrees with drafting along the true path."""
    model = tiny_model()
    heads = tiny_hydra_heads(model, "hydra++", num_heads=3, grounded_residual="hidden", prefix_token=True, noise=0.3)
    ids = torch.randint(0, 200, (20,), generator=torch.Generator().manual_seed(0))
    hidden = model.base_model(input_ids=ids[None]).last_hidden_state[0]  # [T, H]
    top = heads.teacher_topk(hidden, ids, 10)  # [K, T, 10]
    t = 9
    heads.reset()
    heads.observe(hidden[:t + 1], ids[:t + 1])
    d = heads.draft(hidden[t], ids[t + 1], load_tree("chain3"))
    assert d[1] == top[0, t, 0]
    for k in range(3):
        logits = heads.head(k, heads._last[None], ids[t + 1:t + 2 + k][None])
        assert torch.equal(logits.topk(10, dim=-1).indices[0], top[k, t])
    last = heads._last.clone()
    heads.reset()
    heads.observe(hidden[:t + 1], ids[:t + 1])
    heads.draft(hidden[t], (ids[t + 1] + 1) % 200, load_tree("chain3"))
    assert not torch.allclose(heads._last, last)  # another root, another prefix state


def test_token_prefix_input_is_the_fuse_of_the_state_and_the_next_tokens_embedding():
    """prefix_input = fc([h, E(next)]) with fc's weight and bias; the training forward over whole sequences pairs
    each position with path[..., 0] (the next token) and scores like teacher_topk; observe wants the ids."""
    import torch.nn.functional as F

    model = tiny_model()
    heads = tiny_hydra_heads(model, "hydra++", num_heads=2, grounded_residual="hidden", prefix_token=True, noise=0.3)
    assert heads.fuse.bias.abs().max() > 0
    h, nxt = torch.randn(3, 5, 64), torch.randint(0, 200, (3, 5))
    want = F.linear(torch.cat([h, model.get_input_embeddings().weight[nxt]], -1), heads.fuse.weight, heads.fuse.bias)
    torch.testing.assert_close(heads.prefix_input(h, nxt), want)
    ids = torch.randint(0, 200, (12,), generator=torch.Generator().manual_seed(2))
    hidden = model.base_model(input_ids=ids[None]).last_hidden_state  # [1, T, H]
    path = torch.stack([torch.cat([ids[1 + j:], ids.new_zeros(1 + j)]) for j in range(2)], -1)[None]  # [1, T, 2]
    select = torch.zeros(1, 12, dtype=torch.bool)
    select[0, :8] = True
    logits = heads(hidden, path, select)  # [K, 8, vocab]
    top = heads.teacher_topk(hidden[0], ids, 1)[:, :8, 0]  # [K, 8]
    assert torch.equal(heads.to_full_ids(logits.argmax(-1)), top)
    heads.reset()
    with pytest.raises(AssertionError, match="prefix_token heads observe ids too"):
        heads.observe(hidden[0])


def test_token_prefix_is_for_hydra_plus_plus_only():
    from draftheads.errors import UserError
    from draftheads.heads import HeadsConfig

    with pytest.raises(UserError, match="^heads config: prefix_token applies to hydra\\+\\+ heads only$"):
        HeadsConfig.from_dict({"num_heads": 2, "hidden_size": 8, "vocab_size": 16, "head_type": "hydra",
                               "prefix_token": True})


@pytest.mark.parametrize("head_type,token", [("hydra", False), ("hydra++", False), ("hydra++", True)])
def test_native_round_trip_keeps_the_head_type(tmp_path, head_type, token):
    model = tiny_model()
    heads = tiny_hydra_heads(model, head_type, noise=0.3, prefix_token=token)
    save_heads(heads, tmp_path / "h")
    back = load_heads(tmp_path / "h", model).requires_grad_(False)  # as decoding runs it (mutation runs drop no_grad)
    assert isinstance(back, HydraHeads) and back.cfg.head_type == head_type and back.cfg.prefix_token == token
    h, tree = torch.randn(64), load_tree("medusa16", 3)
    if head_type == "hydra++":
        x, ids = torch.randn(7, 64), torch.arange(7)
        heads.reset(), back.reset()
        heads.observe(x, ids), back.observe(x, ids)
    assert torch.equal(heads.draft(h, torch.tensor(4), tree), back.eval().draft(h, torch.tensor(4), tree))
    if head_type == "hydra++":  # decoded, its prefix layer's q/k/v are disjoint views of one fused tensor: saved all the same
        assert heads._lean._fused is not None
        save_heads(heads, tmp_path / "again")
        again = load_heads(tmp_path / "again", model)
        assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), again.state_dict().values()))


def test_prefix_layer_cache_grows_past_its_first_allocation_and_keeps_every_position():
    """observe runs the prefix layer on the lean forward with a cache that doubles when full: across the
    growth (256 -> 512 positions) the last state equals the prefix layer over the whole sequence at once."""
    model = tiny_model()
    heads = tiny_hydra_heads(model, "hydra++")
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(3))
    heads.reset()
    heads.observe(x[:250])  # a prompt: causal among its positions
    assert heads._cache.capacity == 256
    for t in range(250, 300, 3):  # steps of 1-3 accepted positions
        heads.observe(x[t:t + 3])
    assert heads._cache.length == 300 and heads._cache.capacity == 512
    torch.testing.assert_close(heads._last, heads.prefix_states(x[None])[0, -1], atol=1e-4, rtol=1e-4)
    heads.reset()
    heads.observe(torch.cat([x, x]))  # a prompt of 600: the first allocation takes all of it
    assert heads._cache.length == 600 and heads._cache.capacity == 600
    torch.testing.assert_close(heads._last, heads.prefix_states(torch.cat([x, x])[None])[0, -1], atol=1e-4, rtol=1e-4)


def test_a_cache_reserve_keeps_its_entries_and_never_shrinks():
    from draftheads.kvcache import TreeKVCache

    cache = TreeKVCache(2, 4, torch.float32, "cpu")
    k = torch.randn(1, 2, 3, 4)
    cache.append(0, k, -k)
    cache.append(1, 2 * k, -2 * k)
    cache.reserve(2)
    assert cache.capacity == 4
    cache.reserve(10)
    assert cache.capacity == 10 and cache.kv.shape[4] == 10 and cache.length == 3
    keys, values = cache.append(0, k[:, :, :2], k[:, :, :2])  # room past the old capacity
    assert torch.equal(keys[:, :, :3], k) and torch.equal(values[:, :, :3], -k) and keys.shape[2] == 5
    assert torch.equal(cache.kv[1, 0, :, :, :3], 2 * k)


@pytest.mark.skipif(__import__("draftheads.few_rows").few_rows.unavailable_reason() is not None,
                    reason="no AVX2/FMA on this CPU")
@pytest.mark.parametrize("activations", ["int8", "float32"])
@pytest.mark.parametrize("residual,layers,lm_head", [("hidden", 1, "shared"), ("projection", 2, "own")])
def test_packed_hydra_heads_draft_a_chain_in_one_call_with_the_same_ids_and_cuts(monkeypatch, activations, residual,
                                                                                 layers, lm_head):
    """Hydra heads whose weights pack (Q8_0 values, as round_drafter_weights leaves the shipped ones) draft a top-1
    chain in one C++ call (few_rows.hydra_chain): the products, silu, top-1 and probabilities of the depth-by-depth
    path, so the same ids, through VocabTrim's map, and the same cuts; another tree, or gradients, take that path."""
    from draftheads import few_rows
    from draftheads.tree import Tree

    monkeypatch.setattr(few_rows, "_ACTIVATIONS", activations)
    model = tiny_model()
    heads = tiny_hydra_heads(model, "hydra++", num_heads=3, noise=0.3, grounded_residual=residual, num_layers=layers,
                             lm_head=lm_head)
    heads.vocab_map = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(2))
    heads.attach(model)  # a shared LM head takes the backbone's rows in the permuted order
    with torch.no_grad():
        for m in heads.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(few_rows.q8_0_rounded(m.weight))
        if heads.shared_weight is not None:  # the backbone's rows: Q8_0 values in the default model's GGUF
            heads.shared_weight = few_rows.q8_0_rounded(heads.shared_weight)
    calls, packed = [], heads._packed_chain
    monkeypatch.setattr(heads, "_packed_chain", lambda *a: calls.append(packed(*a)) or calls[-1])
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(20, model.config.hidden_size, generator=g)
    heads.reset()
    heads.observe(hidden[:12])
    roots, chain = torch.arange(40, 46), load_tree("chain3")

    def per_depth(fn):
        with monkeypatch.context() as m:
            m.setattr(heads, "_packed_chain", lambda *a: None)
            return fn()

    probs = []
    for root in roots:
        assert torch.equal(heads.draft(hidden[12], root, chain), per_depth(lambda: heads.draft(hidden[12], root, chain)))
        with torch.no_grad():  # as the loop drafts (draft_confident's own call)
            ids, path = heads._draft(hidden[12], root, chain, 1e-9)
            want = per_depth(lambda: heads._draft(hidden[12], root, chain, 1e-9))
        assert torch.equal(ids, want[0]) and torch.equal(path, want[1])
        probs += path[1:].tolist()
    assert len(calls) == 12 and all(c is not None for c in calls)
    for min_prob in sorted(probs)[::5]:  # cuts between nodes, and exactly on a node's path probability (kept: >=)
        for root in roots:
            got = heads.draft_confident(hidden[12:13], root.view(1), chain, min_prob)[0]
            want = per_depth(lambda: heads.draft_confident(hidden[12:13], root.view(1), chain, min_prob)[0])
            assert got[0] is want[0] and torch.equal(got[1], want[1]), (min_prob, int(root))
    calls.clear()
    heads.draft(hidden[12], roots[0], Tree([[0], [1], [0, 0]]))  # a branching tree: depth by depth
    assert calls == []
    with torch.enable_grad():
        assert packed(hidden[12], 5, chain) is None


@pytest.mark.skipif(__import__("draftheads.few_rows").few_rows.unavailable_reason() is not None,
                    reason="no AVX2/FMA on this CPU")
def test_packed_hydra_chain_follows_weights_written_or_replaced(monkeypatch):
    """The one-call chain keeps its packed argument lists between steps (HydraHeads._chain_args, checked by a
    WeightState): a block's weight written in place, the shared LM-head rows replaced (an attribute, no parameter)
    or written in place each draft the new weights' ids, the per-depth path's, from the one call."""
    from draftheads import few_rows

    model = tiny_model()
    heads = tiny_hydra_heads(model, "hydra++", num_heads=3, noise=0.3, grounded_residual="hidden", lm_head="shared")
    heads.attach(model)
    g = torch.Generator().manual_seed(4)
    new_q8 = lambda w: few_rows.q8_0_rounded(torch.randn(w.shape, generator=g) * w.abs().max())  # noqa: E731
    with torch.no_grad():
        for m in heads.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(few_rows.q8_0_rounded(m.weight))
        heads.shared_weight = few_rows.q8_0_rounded(heads.shared_weight)
    calls, packed = [], heads._packed_chain
    monkeypatch.setattr(heads, "_packed_chain", lambda *a: calls.append(packed(*a)) or calls[-1])
    hidden, chain = torch.randn(12, model.config.hidden_size, generator=g), load_tree("chain3")
    heads.reset()
    heads.observe(hidden)

    def drafts():
        out = torch.stack([heads.draft(hidden[-1], torch.tensor(r), chain) for r in range(40, 48)])
        with monkeypatch.context() as m:
            m.setattr(heads, "_packed_chain", lambda *a: None)
            assert torch.equal(out, torch.stack([heads.draft(hidden[-1], torch.tensor(r), chain) for r in range(40, 48)]))
        return out

    first = drafts()
    with torch.no_grad():
        heads.blocks[1][0].linear.weight.copy_(new_q8(heads.blocks[1][0].linear.weight))
    written = drafts()
    heads.shared_weight = new_q8(heads.shared_weight)
    replaced = drafts()
    with torch.no_grad():
        heads.shared_weight.copy_(new_q8(heads.shared_weight))
    rewritten = drafts()
    assert not torch.equal(first[:, 2:], written[:, 2:])
    assert not torch.equal(written, replaced) and not torch.equal(replaced, rewritten)
    assert len(calls) == 32 and all(c is not None for c in calls)
