"""Row-exact verify for reduced precision on a CPU: each tree node's row equals, bit for bit, what plain
decoding computes at its position, so bf16 speculative output equals bf16 plain output."""

import pytest
import torch

from draftheads.backbone import Backbone
from draftheads.cpu_matmul import linear
from draftheads.draftmodel import DraftModel
from draftheads.acceptance import SamplingConfig
from draftheads.engine import TorchEngine
from draftheads.generate import ROOT_ONLY
from draftheads.kvcache import TreeKVCache, path_plan
from draftheads.tree import Tree, load_tree
from bench_fixtures import tiny_dirs  # noqa: F401 (a fixture)
from tiny import ARCHS, tiny_heads, tiny_model, tiny_tokenizer

TREES = {
    "chain": load_tree("chain4"),
    "medusa16": load_tree("medusa16", 3),
    "medusa63": load_tree("medusa63", 4),
    "with_given": Tree([[0], [1], [0, 0]]).with_given([[0, -1], [0, -1, -1], [1, -1]]),
}


def test_a_chain_needs_no_copy():
    order, moved = path_plan((-1, 0, 1, 2))
    assert order == ((0, 0, False), (1, 1, False), (2, 2, False), (3, 3, False)) and not moved


@pytest.mark.parametrize("name", sorted(TREES))
def test_plan_puts_each_nodes_path_in_its_slots(name):
    tree = TREES[name]
    order, moved = path_plan(tuple(tree.parent))
    assert sorted(node for node, _, _ in order) == list(range(tree.size))  # every node once
    slots = list(range(tree.size))  # slot d holds node d after the pass writes the nodes in order
    for node, depth, copy in order:
        assert copy == (slots[depth] != node)
        slots[depth] = node
        assert slots[:depth + 1] == tree.path_to(node)  # the prefix of slots is exactly its path
    assert moved == any(c for _, _, c in order) == (name not in ("chain",))


@pytest.mark.parametrize("name", sorted(TREES))
def test_append_rows_views_hold_the_prefix_then_the_path(name):
    tree, L = TREES[name], 5
    cache = TreeKVCache(2, L + tree.size, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    prefix = [torch.randn(1, 2, L, 4, generator=g) for _ in range(2)]
    cache.append(1, *prefix)
    keys, values = (torch.randn(1, 2, tree.size, 4, generator=g) for _ in range(2))
    seen = set()
    all_keys, all_values, views = cache.append_rows(1, keys, values, {0: tuple(tree.parent)})
    assert torch.equal(all_keys, torch.cat([prefix[0], keys], 2))  # every node at its own column first
    assert torch.equal(all_values, torch.cat([prefix[1], values], 2))
    for row, node, k, v in views:
        assert row == 0
        path = tree.path_to(node)
        assert torch.equal(k, torch.cat([prefix[0], keys[:, :, path]], 2))
        assert torch.equal(v, torch.cat([prefix[1], values[:, :, path]], 2))
        seen.add(node)
    assert seen == set(range(tree.size))
    # Afterwards the layer holds the nodes in their own order, as `append` leaves them (for `keep`).
    assert cache.layers[1].length == L + tree.size
    assert torch.equal(cache.kv[1, 0, :, :, L:], keys) and torch.equal(cache.kv[1, 1, :, :, L:], values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_rows_attention_call_over_several_sequences_gives_each_row_what_it_gets_alone(dtype):
    """What lets a batched bf16 pass attend in one call per layer: chain nodes of sequences with other
    lengths (masked keys after their own, other rows in the call) change no row's bits. Checked here on
    other shapes than the runtime probe's, which decides whether the forward relies on it."""
    from draftheads.row_attention import batched_rows_are_exact, chain_visibility, rows_attention

    if not batched_rows_are_exact(dtype, torch.get_num_threads(), 2, 4, 32):
        pytest.skip("this CPU's kernels are not row-exact across calls: the forward attends row by row")
    g = torch.Generator().manual_seed(4)
    kv_heads, group, d, q = 2, 4, 32, 5
    starts = torch.tensor([0, 17, 63, 130, 515, 9])
    n = int(starts.max()) + q
    keys, values = (torch.randn(6, kv_heads, n, d, generator=g).to(dtype) for _ in range(2))
    qs = (3 * torch.randn(6, kv_heads * group, q, d, generator=g)).to(dtype)
    together = rows_attention(qs, keys, values, chain_visibility(starts, q, n, group), 0.17)  # [6, heads, q, d]
    for r in range(6):
        for j in range(q):
            m = int(starts[r]) + j + 1
            alone = rows_attention(qs[r:r + 1, :, j:j + 1], keys[r:r + 1, :, :m], values[r:r + 1, :, :m], None, 0.17)
            assert torch.equal(alone[0, :, 0], together[r, :, j]), (r, j)
            ref = torch.nn.functional.scaled_dot_product_attention(  # and it is attention
                qs[r:r + 1, :, j:j + 1].float(), keys[r:r + 1, :, :m].float(), values[r:r + 1, :, :m].float(),
                scale=0.17, enable_gqa=True)
            torch.testing.assert_close(alone.float(), ref, rtol=2e-2, atol=2e-2)


def test_chain_visibility_shows_each_node_the_prefix_and_its_ancestors():
    from draftheads.row_attention import chain_visibility

    v = chain_visibility(torch.tensor([2, 0]), q=2, n=4, g=2)  # [2, 1, 4, 4]
    assert v.shape == (2, 1, 4, 4)
    assert v[0, 0].int().tolist() == [[1, 1, 1, 0]] * 2 + [[1, 1, 1, 1]] * 2
    assert v[1, 0].int().tolist() == [[1, 0, 0, 0]] * 2 + [[1, 1, 0, 0]] * 2


def test_the_forward_attends_row_by_row_where_batched_rows_are_not_exact(monkeypatch):
    """If the probe finds this CPU's kernels shape-dependent, every node attends alone, and bf16 tree
    rows still equal plain steps."""
    import draftheads.llama_forward as lf

    monkeypatch.setattr(lf, "batched_rows_are_exact", lambda *shape: False)
    calls = []
    real = lf.rows_attention
    monkeypatch.setattr(lf, "rows_attention", lambda q, *a: calls.append(q.shape[2]) or real(q, *a))
    test_bf16_tree_rows_equal_plain_steps_bit_for_bit("llama", "chain", torch.bfloat16)
    assert calls and set(calls) == {1}  # one node per call


def test_one_row_bf16_products_are_two_row_products():
    # down_proj's shape (in 1536), heavy-tailed rows like real activations: on a CPU with AVX512-BF16,
    # oneDNN's one-row kernel gives 7 of these 40 rows differently from the 40-row product; with AMX, its
    # 33+-row kernel gives rows other than the 2-32-row one.
    g = torch.Generator().manual_seed(0)
    w = (0.02 * torch.randn(576, 1536, generator=g)).bfloat16()
    x = (3 * torch.randn(40, 1536, generator=g) * torch.rand(40, 1536, generator=g) ** 4).bfloat16()
    alone = torch.cat([linear(x[r:r + 1], w) for r in range(40)])  # [40, 576]
    for n in (2, 7, 32, 33, 40):  # on an AMX CPU oneDNN's kernel changes past 32 rows: linear keeps the rows
        assert torch.equal(linear(x[:n], w), alone[:n]), n
    assert torch.equal(linear(x[0], w), alone[0])  # a 1-d row too


def _plain_hidden(engine, prompt: torch.Tensor, path_ids: torch.Tensor) -> torch.Tensor:
    """Prefill `prompt`, then plain one-token steps over path_ids: the last step's hidden state [H]."""
    cache = engine.new_cache(prompt.numel() + path_ids.numel())
    engine.prefill(cache, prompt)
    for t in path_ids.tolist():
        h = engine.verify(cache, torch.tensor([t]), ROOT_ONLY)[1]  # [1, H]
    return h[0]


@pytest.mark.parametrize("arch,name,dtype", [(a, n, torch.bfloat16) for a in sorted(ARCHS)
                                              for n in ("chain", "medusa63", "with_given")]
                         + [("llama", "medusa63", torch.float16)])
def test_bf16_tree_rows_equal_plain_steps_bit_for_bit(arch, name, dtype):
    model = tiny_model(arch, hidden=128, layers=3).to(dtype)
    engine = TorchEngine(model)
    assert engine.row_exact and engine.lean is not None
    tree = TREES[name]
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 250, (23,), generator=g)
    cands = torch.randint(0, 250, (tree.size,), generator=g)
    cache = engine.new_cache(prompt.numel() + tree.size)
    engine.prefill(cache, prompt)
    logits, hidden = engine.verify(cache, cands, tree)  # [nodes, vocab], [nodes, H]
    for node in range(tree.size):
        plain = _plain_hidden(engine, prompt, cands[tree.path_to(node)])
        assert torch.equal(hidden[node], plain), (arch, name, node)
        assert torch.equal(logits[node], engine.logits(plain))


def test_a_row_exact_step_attends_whole_key_blocks_and_the_columns_past_the_sequence_change_nothing(monkeypatch):
    """The keys a chain step attends run to a multiple of KEY_BLOCK (a bf16 product per key count costs
    oneDNN a new kernel); the columns past the sequence are masked, whatever they hold."""
    import draftheads.llama_forward as lf
    from draftheads.kvcache import KEY_BLOCK

    model = tiny_model("llama", hidden=128, layers=3).to(torch.bfloat16)
    engine = TorchEngine(model)
    fwd = engine.lean
    if not lf.batched_rows_are_exact(torch.bfloat16, torch.get_num_threads(), fwd.kv_heads, fwd.heads // fwd.kv_heads,
                                     fwd.head_dim):
        pytest.skip("this CPU's kernels are not row-exact across calls: every node attends alone, unpadded")
    tree = TREES["chain"]
    g = torch.Generator().manual_seed(3)
    prompt, cands = torch.randint(0, 250, (70,), generator=g), torch.randint(0, 250, (tree.size,), generator=g)
    seen = []
    real = lf.rows_attention
    monkeypatch.setattr(lf, "rows_attention", lambda q, k, *a: seen.append(k.shape[2]) or real(q, k, *a))
    out = []
    for capacity, junk in ((70 + tree.size, False), (300, False), (300, True)):
        cache = engine.new_cache(capacity)
        engine.prefill(cache, prompt)
        if junk:  # what a longer sequence left behind
            cache.kv[..., 70:, :] = (100 * torch.randn(cache.kv[..., 70:, :].shape, generator=g)).bfloat16()
        seen.clear()
        out.append(engine.verify(cache, cands, tree))  # logits [nodes, vocab], hidden [nodes, H]
        assert set(seen) == {min(2 * KEY_BLOCK, capacity)}, seen  # 74 keys: up to 128, or the whole cache
    for logits, hidden in out[1:]:
        assert torch.equal(logits, out[0][0]) and torch.equal(hidden, out[0][1])


def test_fp32_row_exact_pass_matches_the_masked_pass():
    model = tiny_model("llama")
    engine = TorchEngine(model)
    assert not engine.row_exact  # fp32 keeps the one masked call per layer
    tree = TREES["medusa63"]
    g = torch.Generator().manual_seed(2)
    prompt, cands = torch.randint(0, 250, (17,), generator=g), torch.randint(0, 250, (tree.size,), generator=g)
    out = {}
    for exact in (False, True):
        engine.row_exact = exact
        cache = engine.new_cache(17 + tree.size)
        engine.prefill(cache, prompt)
        out[exact] = engine.verify(cache, cands, tree)[1]
    # Not bit-equal: the two passes multiply through different kernels (cpu_matmul picks per machine), whose sums
    # run in different orders. Logits here reach ~4; an AMD EPYC (AVX-512, stop 56) differed by up to 1.7e-4, an
    # Intel Xeon by less than 1e-4. A wrong mask or cache row moves them by ~0.1 or more.
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=5e-4)
    assert torch.equal(out[True].argmax(-1), out[False].argmax(-1))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bf16_speculative_greedy_equals_plain_greedy(arch):
    model = tiny_model(arch, hidden=128, layers=3)
    heads = tiny_heads(model, num_heads=4, noise=0.02)
    model, heads = model.to(torch.bfloat16), heads.to(torch.bfloat16)
    bb = Backbone(model=model, tokenizer=tiny_tokenizer(), name="tiny")
    spec = DraftModel(bb, heads, load_tree("medusa63", 4))
    plain = DraftModel(bb, None, None)
    accepted = []
    for prompt in ("The cat sat on the", "Write a list of numbers: 1, 2, 3,", "abcabcabc"):
        a = plain.generate(prompt, max_new_tokens=48)
        b = spec.generate(prompt, max_new_tokens=48)
        assert b.token_ids == a.token_ids, (arch, prompt)
        accepted.append(b.stats.mean_accepted)
    assert max(accepted) > 1.0  # the heads' drafts were accepted: the tree rows were really used


@pytest.mark.parametrize("arch,confidence", [("llama", 0.0), ("qwen2", 0.0), ("llama", 0.05)])
def test_bf16_batched_decoding_equals_each_sequence_alone(arch, confidence):
    """A batched pass in bf16 runs row-exact too (each slot's nodes over their own slot's keys): every
    sequence gets, token for token, what bf16 greedy decoding gives it alone, whatever else shares the
    pass: other trees, other lengths, plain sequences, sequences joining and leaving, trees cut to their
    confident nodes, and the padding that all of these leave, which the pass packs away."""
    from draftheads.batch import BatchDecoder
    from draftheads.generate import Decoder, Stats
    from test_batch import drive

    model = tiny_model(arch, hidden=128, layers=3).to(torch.bfloat16)
    heads = tiny_heads(tiny_model(arch, hidden=128, layers=3), num_heads=3, noise=0.02).to(torch.bfloat16)
    dec = Decoder(model, heads, load_tree("medusa16", 3))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 250, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 12, 3)]
    trees = [load_tree("medusa16", 3), Tree([]), load_tree("chain3"), Tree([[0], [1], [0, 0]]), None, load_tree("medusa16", 3)]
    batch = BatchDecoder(dec, slots=3, capacity=128, prefill_chunk=4, draft_confidence=confidence)  # chunking is off in row-exact mode
    assert batch.row_exact and batch.prefill_chunk is None
    got = drive(batch, [(p, SamplingConfig(), t) for p, t in zip(prompts, trees)], 40)
    alone = []
    for p, t in zip(prompts, trees):
        stats = Stats()
        toks = []
        for step in dec.steps(p, 40, SamplingConfig(), stats, t):
            toks += step
            if len(toks) >= 40:
                break
        alone.append(toks[:40])
    assert got == alone
    plain = Decoder(model)  # and alone is plain bf16 greedy decoding
    for p, a in zip(prompts[:2], alone):
        toks = []
        for step in plain.steps(p, 40, SamplingConfig(), Stats()):
            toks += step
            if len(toks) >= 40:
                break
        assert toks[:40] == a


def test_trees_calibrated_for_bf16_are_stored_apart_and_taken_in_bf16(tiny_dirs):
    """calibrate --write-to-heads in bf16 writes device_trees["cpu bfloat16"] and leaves the fp32 tree;
    load takes each where the backbone runs; a malformed entry is refused in one line."""
    import json

    from draftheads import load
    from draftheads.bench import _write_tree_to_heads
    from draftheads.errors import UserError
    from draftheads.heads.medusa import HeadsConfig

    bb, heads, _ = tiny_dirs
    _write_tree_to_heads(heads, [[0], [1], [0, 0]], {"1": {"tree": [[0]]}})  # a CPU fp32 calibration
    _write_tree_to_heads(heads, [[0], [0, 0], [0, 0, 0]], {"1": {"tree": [[0], [1]]}, "8": {"tree": []}}, "cpu bfloat16")
    cfg = json.loads((heads / "config.json").read_text())
    assert cfg["tree"] == [[0], [1], [0, 0]] and cfg["batch_trees"] == {"1": [[0]]}
    assert cfg["device_trees"] == {"cpu bfloat16": {"tree": [[0], [0, 0], [0, 0, 0]], "batch_trees": {"1": [[0], [1]], "8": []}}}
    fp32, bf16 = load(heads=str(heads), backbone=str(bb)), load(heads=str(heads), backbone=str(bb), dtype="bfloat16")
    assert fp32.tree.to_json() == [[0], [1], [0, 0]] and {b: t.size for b, t in fp32.batch_trees.items()} == {1: 2}
    assert bf16.tree.to_json() == [[0], [0, 0], [0, 0, 0]] and {b: t.size for b, t in bf16.batch_trees.items()} == {1: 3, 8: 1}
    for bad in ({"bfloat16": {"tree": [[0]]}}, {"cpu bfloat16": {"tree": [[0]], "other": 1}},
                {"cpu bfloat16": {"batch_trees": {"eight": [[0]]}}}):
        with pytest.raises(UserError, match="device_trees must map"):
            HeadsConfig.from_dict({"num_heads": 2, "hidden_size": 8, "vocab_size": 10, "device_trees": bad})


def test_cpu_class_follows_the_flags_the_kernels_compile_for():
    from draftheads.few_rows import CPU_CLASSES, cpu_class

    assert cpu_class({"sse4_2", "avx"}) is None and cpu_class({"avx2"}) is None  # no FMA: the kernels do not build
    assert cpu_class({"avx2", "fma", "avx512f"}) == "avx2"  # AVX-512 without VNNI takes the AVX2 bodies
    assert cpu_class({"avx2", "fma", "avx512_vnni"}) == "avx2"  # the VNNI bodies need AVX-512 BW too
    assert cpu_class({"avx2", "fma", "avx512bw", "avx512_vnni"}) == "avx512-vnni"
    assert cpu_class({"avx2", "fma", "avx512bw", "avx512_vnni", "amx_tile"}) == "avx512-vnni"  # the AMX body: int8 tiles
    assert cpu_class({"avx2", "fma", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8"}) == "amx"
    assert cpu_class() in (*CPU_CLASSES, None)  # this machine's


def test_trees_calibrated_for_a_cpu_class_are_taken_on_that_class_only(tiny_dirs, monkeypatch, capsys):
    """calibrate --cpu-class --write-to-heads stores device_trees["cpu float32 <class>"] beside the tree for any CPU;
    load takes it on a CPU of that class and the other elsewhere; --cpu-class without --write-to-heads is refused
    in one line; a class the kernels do not have is refused in the config."""
    import json

    from draftheads import few_rows, load
    from draftheads.bench import _write_tree_to_heads
    from draftheads.cli import main
    from draftheads.errors import UserError
    from draftheads.heads.medusa import HeadsConfig

    bb, heads, questions = tiny_dirs
    _write_tree_to_heads(heads, [[0], [1], [0, 0]], {"1": {"tree": [[0]]}})  # for any CPU
    _write_tree_to_heads(heads, [], None, "cpu float32 avx2", None, True, {"tree": [[0], [0, 0]], "draft_confidence": 0.3})
    cfg = json.loads((heads / "config.json").read_text())
    assert cfg["tree"] == [[0], [1], [0, 0]] and cfg["device_trees"]["cpu float32 avx2"]["tree"] == []
    for cls, tree, alone in (("avx2", [], [[0], [0, 0]]), ("avx512-vnni", [[0], [1], [0, 0]], [[0], [1], [0, 0]]),
                             (None, [[0], [1], [0, 0]], [[0], [1], [0, 0]])):
        monkeypatch.setattr(few_rows, "cpu_class", lambda flags=None, cls=cls: cls)
        dm = load(heads=str(heads), backbone=str(bb), lookup=True)
        assert dm.tree.to_json() == tree, cls
        assert load(heads=str(heads), backbone=str(bb), lookup=False).tree.to_json() == alone, cls
    # in bf16 the class's bf16 entry, else the bf16 one, never the float32 class's
    _write_tree_to_heads(heads, [[0], [1]], None, "cpu bfloat16")
    for cls, tree in (("avx2", [[0], [1]]), ("avx512-vnni", [[0], [1]])):
        monkeypatch.setattr(few_rows, "cpu_class", lambda flags=None, cls=cls: cls)
        assert load(heads=str(heads), backbone=str(bb), dtype="bfloat16", lookup=False).tree.to_json() == tree
    _write_tree_to_heads(heads, [[0], [0, 0], [0, 0, 0]], None, "cpu bfloat16 avx2")
    for cls, tree in (("avx2", [[0], [0, 0], [0, 0, 0]]), ("avx512-vnni", [[0], [1]])):
        monkeypatch.setattr(few_rows, "cpu_class", lambda flags=None, cls=cls: cls)
        assert load(heads=str(heads), backbone=str(bb), dtype="bfloat16", lookup=False).tree.to_json() == tree
    # the command: a calibration for this class goes under its key, the one for any CPU stays
    monkeypatch.setattr(few_rows, "cpu_class", lambda flags=None: "amx")
    out = heads.parent / "tree.json"
    assert main(["calibrate", "--backbone", str(bb), "--heads", str(heads), "--prompts", str(questions), "--out", str(out),
                 "--max-new-tokens", "8", "--max-nodes", "4", "--latency-sizes", "1,4", "--latency-steps", "2",
                 "--threads", "1", "--draft-confidence", "0", "--no-measure", "--write-to-heads", "--cpu-class"]) == 0
    cfg = json.loads((heads / "config.json").read_text())
    assert json.loads(out.read_text())["calibrated_for"] == "cpu float32 amx" and cfg["tree"] == [[0], [1], [0, 0]]
    assert load(heads=str(heads), backbone=str(bb), lookup=False).tree.to_json() == cfg["device_trees"]["cpu float32 amx"]["tree"]
    assert main(["calibrate", "--backbone", str(bb), "--heads", str(heads), "--prompts", str(questions), "--cpu-class"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("draftheads: error:")]
    assert len(errors) == 1 and "--cpu-class stores a CPU's calibration" in errors[0]
    HeadsConfig.from_dict({"num_heads": 2, "hidden_size": 8, "vocab_size": 10, "device_trees": {"cpu float32 amx": {}}})
    for bad in ("cpu float32 sse", "cpu float32 avx2 extra"):
        with pytest.raises(UserError, match="device_trees must map"):
            HeadsConfig.from_dict({"num_heads": 2, "hidden_size": 8, "vocab_size": 10, "device_trees": {bad: {"tree": [[0]]}}})


def test_a_row_exact_batch_step_refuses_to_write_past_a_slot():
    from draftheads.kvcache import SlotKVCache

    cache = SlotKVCache(1, 2, 8, 1, 2, torch.float32, "cpu")
    cache.lengths[:] = torch.tensor([3, 5])
    cache.begin_step(2, 3)  # slot 1's nodes end exactly at the capacity
    assert cache._starts == [3, 5]
    for n, q in ((2, 4), (3, 1)):  # one column past a slot; a slot the cache does not have
        with pytest.raises(AssertionError, match="KV cache overflow"):
            cache.begin_step(n, q)


def test_the_probe_notices_rows_that_depend_on_the_call(monkeypatch):
    """The probe is a real check: attention whose rows change with the batch makes it answer False."""
    import draftheads.row_attention as ra

    real = ra.rows_attention
    monkeypatch.setattr(ra, "rows_attention", lambda q, k, v, vis, scale: real(q, k, v, vis, scale) * (1.5 if q.shape[0] > 1 else 1))
    assert ra.batched_rows_are_exact(torch.bfloat16, 1, 1, 2, 16) is False  # a shape no other test probes


def test_is_chain():
    from draftheads.kvcache import is_chain

    assert is_chain((-1,)) and is_chain((-1, 0, 1, 2))
    assert not is_chain((-1, 0, 0)) and not is_chain((-1, 0, 1, 1)) and not is_chain(tuple(TREES["medusa16"].parent))


def test_a_chain_attends_in_one_call_per_layer_and_a_branching_tree_node_by_node(monkeypatch):
    """What makes bf16 trees cheap: where the probe allows it, a chain's nodes (and a plain step) share
    one attention call per layer; a branching tree's nodes get one each."""
    import draftheads.llama_forward as lf

    monkeypatch.setattr(lf, "batched_rows_are_exact", lambda *shape: True)
    calls = []
    real = lf.rows_attention
    monkeypatch.setattr(lf, "rows_attention", lambda q, *a: calls.append(q.shape[2]) or real(q, *a))
    model = tiny_model("llama", hidden=128, layers=3).to(torch.bfloat16)
    engine = TorchEngine(model)
    prompt = torch.arange(5, 28)
    for name, per_layer in (("chain", [TREES["chain"].size]), ("with_given", [1] * TREES["with_given"].size)):
        tree = TREES[name]
        cache = engine.new_cache(prompt.numel() + tree.size)
        engine.prefill(cache, prompt)
        calls.clear()
        engine.verify(cache, torch.arange(1, tree.size + 1), tree)
        assert calls == per_layer * 3, name  # 3 layers


def test_a_lone_bf16_sequence_keeps_the_row_exact_pass(monkeypatch):
    """Alone in slot 0 a sequence takes the serial loop's unpadded pass only where attention needs no row-exact
    care: in bf16 on a CPU it keeps the row-exact one (each node over its own path), and equals decoding alone."""
    from draftheads.batch import BatchDecoder
    from draftheads.generate import Decoder, Stats
    from test_batch import drive

    model = tiny_model("qwen2", hidden=128, layers=3).to(torch.bfloat16)
    heads = tiny_heads(tiny_model("qwen2", hidden=128, layers=3), num_heads=3, noise=0.02).to(torch.bfloat16)
    dec = Decoder(model, heads, load_tree("medusa16", 3))
    batch = BatchDecoder(dec, slots=2, capacity=96, draft_confidence=0.0)
    calls = []
    for name in ("_verify_alone", "_verify_padded"):
        monkeypatch.setattr(batch, name, lambda *a, f=getattr(batch, name), name=name: calls.append(name) or f(*a))
    p = torch.randint(0, 250, (11,), generator=torch.Generator().manual_seed(6)).tolist()
    got = drive(batch, [(p, SamplingConfig(), None)], 30)[0]
    alone = []
    for step in dec.steps(p, 30, SamplingConfig(), Stats()):
        alone += step
        if len(alone) >= 30:
            break
    assert got == alone[:30]
    assert calls and set(calls) == {"_verify_padded"}
