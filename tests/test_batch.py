"""Batched decoding: many sequences per verify pass give each sequence the output it gets alone."""

import pytest
import torch
from scipy.stats import chisquare
from bench_fixtures import tiny_dirs  # noqa: F401 (a fixture)
from test_loop import hf_greedy, run
from tiny import tiny_heads, tiny_model

from draftheads import few_rows, kvcache
from draftheads.acceptance import SamplingConfig
from draftheads.batch import BatchDecoder
from draftheads.defaults import BATCH_DRAFT_CONFIDENCE
from draftheads.errors import UserError
from draftheads.generate import Decoder, Stats
from draftheads.tree import Tree, load_tree


def drive(batch: BatchDecoder, requests, n_new):
    """The server's scheduler in miniature: admit into free slots, step, hand each sequence its tokens.
    requests: (prompt, sampling, tree) -> outputs in request order (n_new tokens each)."""
    waiting, running, out = list(enumerate(requests)), {}, {}
    while waiting or running:
        while waiting and batch.free:
            i, (prompt, sp, tree) = waiting.pop(0)
            gen = batch.steps(prompt, n_new, sp, Stats(), tree)
            running[i], out[i] = gen, list(next(gen))
        batch.step()
        for i, gen in list(running.items()):
            step = next(gen, None)
            if step is not None:
                out[i] += step
            if step is None or len(out[i]) >= n_new:
                gen.close()  # frees the slot
                del running[i]
    return [out[i][:n_new] for i in range(len(requests))]


@pytest.mark.parametrize("kv", ["float32", "float16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_greedy_equals_each_sequence_alone(arch, kv, monkeypatch):
    """In float32 each sequence's output is transformers' greedy output; with the cache in float16 (the default
    on a CPU) it is our plain loop's over the same rounded cache, each sequence decoded alone."""
    monkeypatch.setattr(kvcache, "_KV_CACHE", kv)
    model = tiny_model(arch)
    heads = tiny_heads(model, num_heads=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 12)]
    trees = [load_tree("medusa16", 3), Tree([]), load_tree("chain3"), Tree([[0], [1], [0, 0]]), None]
    batch = BatchDecoder(Decoder(model, heads, load_tree("medusa16", 3)), slots=3, capacity=128, draft_confidence=0.0)
    assert batch.cache.kv.dtype == getattr(torch, kv)
    got = drive(batch, [(p, SamplingConfig(), t) for p, t in zip(prompts, trees)], 40)
    alone = [hf_greedy(model, p, 40) for p in prompts] if kv == "float32" else [run(Decoder(model), p, 40) for p in prompts]
    assert got == alone
    assert sorted(batch.free) == [0, 1, 2] and not batch.seqs and int(batch.cache.lengths.sum()) == 0


@pytest.mark.parametrize("tree", [Tree([]), Tree([[0]]), load_tree("medusa16", 3)])
def test_a_lone_sequence_takes_the_unpadded_pass_and_stays_exact(tree, monkeypatch):
    """A sequence alone in slot 0 (a server's one client) runs the serial loop's pass: no padding rows,
    and no mask for a plain step. Once another slot is in the pass, the padded pass runs."""
    model = tiny_model("qwen2")
    batch = BatchDecoder(Decoder(model, tiny_heads(model, num_heads=3), load_tree("medusa16", 3)), slots=2,
                         capacity=128, draft_confidence=0.0)
    calls = []
    for name in ("_verify_alone", "_verify_padded"):
        monkeypatch.setattr(batch, name, lambda *a, f=getattr(batch, name), name=name: calls.append(name) or f(*a))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (7, 19, 11)]
    for p in prompts[:2]:  # one request at a time
        assert drive(batch, [(p, SamplingConfig(), tree)], 30) == [hf_greedy(model, p, 30)]
    assert calls and set(calls) == {"_verify_alone"}
    calls.clear()
    assert drive(batch, [(p, SamplingConfig(), tree) for p in prompts], 30) == [hf_greedy(model, p, 30) for p in prompts]
    assert "_verify_padded" in calls


def test_slots_are_reused_without_leaks():
    model = tiny_model()
    batch = BatchDecoder(Decoder(model, tiny_heads(model)), slots=4, capacity=64, draft_confidence=0.0)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 200, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
               for _ in range(100)]
    got = drive(batch, [(p, SamplingConfig(), None) for p in prompts], 6)
    assert got[:5] == [hf_greedy(model, p, 6) for p in prompts[:5]] and all(len(x) == 6 for x in got)
    assert sorted(batch.free) == [0, 1, 2, 3] and not batch.seqs


def test_a_sequence_leaving_mid_batch_leaves_the_others_unchanged():
    model = tiny_model()
    heads = tiny_heads(model)
    prompts = [list(range(10, 20)), list(range(40, 47)), list(range(90, 102))]
    batch = BatchDecoder(Decoder(model, heads, load_tree("medusa16", 3)), slots=3, capacity=128, draft_confidence=0.0)
    gens = [batch.steps(p, 40, SamplingConfig(), Stats()) for p in prompts]
    out = [list(next(g)) for g in gens]
    for step in range(60):
        batch.step()
        for i, g in enumerate(gens):
            if g is None:
                continue
            out[i] += next(g, [])
            if i == 1 and step == 3:  # its client left
                g.close()
                gens[1] = None
                assert batch.free == [1]  # its slot is free at once
    for i in (0, 2):
        assert out[i][:40] == hf_greedy(model, prompts[i], 40)


def test_exact_sampling_in_a_batch_keeps_the_backbones_distribution():
    """The first drafted position's token, sampled through tree acceptance inside a batch, against the
    backbone's own probabilities (chi-square; the other sequence in the batch is greedy)."""
    model = tiny_model()
    heads = tiny_heads(model, noise=0.3)
    prompt = list(range(30, 38))
    sp = SamplingConfig(temperature=1.5, acceptance="exact")
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1] / 1.5
    probs = logits.softmax(-1)
    top = probs.topk(6).indices
    counts = torch.zeros(7)
    batch = BatchDecoder(Decoder(model, heads, load_tree("medusa16", 3)), slots=2, capacity=64, draft_confidence=0.0)
    for seed in range(1500):
        other = batch.steps(list(range(5, 15)), 4, SamplingConfig(), Stats())
        next(other)
        mine = batch.steps(prompt, 4, SamplingConfig(**{**sp.__dict__, "seed": seed}), Stats())
        first = next(mine)[0]
        mine.close(), other.close()
        hit = (top == first).nonzero()
        counts[int(hit[0, 0]) if hit.numel() else 6] += 1
    expected = torch.cat([probs[top], 1 - probs[top].sum(0, keepdim=True)]) * counts.sum()
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_long_prompts_are_refused_clearly():
    model = tiny_model()
    batch = BatchDecoder(Decoder(model, tiny_heads(model)), slots=2, capacity=32, draft_confidence=0.0)
    with pytest.raises(UserError, match="batch slot holds 32"):
        next(batch.steps(list(range(40)), 4, SamplingConfig(), Stats()))
    assert sorted(batch.free) == [0, 1]


@pytest.mark.parametrize("head_type", ["hydra", "hydra++"])
def test_hydra_heads_batch_each_sequence_drafting_as_it_would_alone(head_type):
    """Hydra++'s prefix layer keeps a cache per sequence (for_sequence): batched, each sequence accepts
    exactly what it accepts alone, step by step (one shared cache would draft from the others' states),
    and the output equals plain greedy."""
    from tiny import tiny_hydra_heads

    model = tiny_model()
    heads = tiny_hydra_heads(model, head_type)
    tree = load_tree("medusa16", 3)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (12, 7, 20)]
    batch = BatchDecoder(Decoder(model, heads, tree), slots=3, capacity=128, draft_confidence=0.0)
    stats = [Stats() for _ in prompts]
    gens = [batch.steps(p, 30, SamplingConfig(), s) for p, s in zip(prompts, stats)]
    out = [list(next(g)) for g in gens]
    while any(len(o) < 30 for o in out):
        batch.step()
        for o, g in zip(out, gens):
            o += next(g, [])
    for g in gens:
        g.close()
    for p, o, s in zip(prompts, out, stats):
        alone = Stats()
        steps = Decoder(model, heads, tree).steps(p, 30, SamplingConfig(), alone)
        got = [t for _, chunk in zip(range(len(s.accepted) + 1), steps) for t in chunk]
        assert o[:30] == got[:30] == hf_greedy(model, p, 30)
        assert s.accepted == alone.accepted[:len(s.accepted)] and sum(s.accepted) > len(s.accepted)


def test_a_plain_table_runs_no_hydra_prefix_layer_in_the_batch(monkeypatch):
    """Heads whose every tree in the batch is plain (calibrate's choice beside prompt lookup) draft nothing: the
    batch leaves them out of each sequence's drafter (Hydra++'s prefix layer is never run), the lookup still drafts,
    and the output equals plain greedy; a table with a tree, or a request naming one, keeps them."""
    from tiny import tiny_hydra_heads

    from draftheads.lookup import LookupConfig, PromptLookup

    model = tiny_model()
    heads = tiny_hydra_heads(model, "hydra++")
    observed = []
    observe = type(heads).observe  # on the class: each sequence drafts with its own copy (for_sequence)
    monkeypatch.setattr(type(heads), "observe", lambda self, h, ids: (observed.append(len(ids)), observe(self, h, ids))[1])
    prompts = [[5, 6, 7, 8] * 3, [9, 10, 11] * 4]
    dec = Decoder(model, heads, load_tree([], 3), PromptLookup(LookupConfig()))
    batch = BatchDecoder(dec, slots=2, capacity=96, batch_trees={1: Tree([]), 2: Tree([])}, draft_confidence=0.0)
    assert drive(batch, [(p, SamplingConfig(), None) for p in prompts], 20) == [hf_greedy(model, p, 20) for p in prompts]
    assert observed == []
    batch = BatchDecoder(dec, slots=2, capacity=96, batch_trees={1: Tree([]), 2: load_tree("chain2", 3)},
                         draft_confidence=0.0)
    assert drive(batch, [(p, SamplingConfig(), None) for p in prompts], 20) == [hf_greedy(model, p, 20) for p in prompts]
    assert observed  # a tree at 2 sequences: the heads follow every sequence from its prompt on


def _recording(init, made: list):
    """BatchDecoder.__init__ that also keeps each instance in `made`."""
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)
    return wrapped


def test_generate_many_equals_generate_one_by_one(monkeypatch):
    from tiny import tiny_draftmodel

    dm = tiny_draftmodel(tree="medusa16")
    prompts = ["hello there", "a much longer prompt about hash tables and trees", "x", "count to ten"]
    many = dm.generate_many(prompts, max_batch=3, max_new_tokens=24, stop="zz")
    for p, r in zip(prompts, many):
        one = dm.generate(p, max_new_tokens=24, stop="zz")
        assert r.token_ids == one.token_ids and r.text == one.text and r.finish_reason == one.finish_reason
    # one slot: the same tree as alone, in as many verify passes (a reply complete at a step frees its slot
    # before the owner's next pass, which would otherwise verify a row for it)
    for p, r in zip(prompts, dm.generate_many(prompts, max_batch=1, max_new_tokens=24)):
        one = dm.generate(p, max_new_tokens=24)
        assert (r.token_ids, r.stats.steps, r.stats.accepted) == (one.token_ids, one.stats.steps, one.stats.accepted)
    # no more cache slots than prompts (each is allocated whole)
    made = []
    monkeypatch.setattr(BatchDecoder, "__init__", _recording(BatchDecoder.__init__, made))
    two = dm.generate_many(prompts[:2], max_batch=8, max_new_tokens=4)
    assert two[1].token_ids == dm.generate(prompts[1], max_new_tokens=4).token_ids
    assert [b.cache.kv.shape[2] for b in made] == [2]
    # generate takes a list of prompts too (strings, conversations, id tensors): one Result each, batched
    chat = [{"role": "user", "content": prompts[1]}]
    listed = dm.generate([prompts[0], chat, torch.tensor(dm.prompt_ids(prompts[3]))], max_new_tokens=24, stop="zz")
    assert [r.token_ids for r in listed] == [many[0].token_ids, many[1].token_ids, many[3].token_ids]
    assert dm.generate(chat, max_new_tokens=24, stop="zz").token_ids == many[1].token_ids  # one conversation
    for bad in ([1, 2, 3], ["hi", {"role": "user", "content": "x"}]):
        with pytest.raises(UserError, match="a prompt is a string"):
            dm.generate(bad, max_new_tokens=4)


def test_a_row_budget_decodes_plainly_past_it_and_stays_exact():
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    prompts = [list(range(10, 20)), list(range(40, 47)), list(range(90, 102))]
    reqs = [(p, SamplingConfig(), None) for p in prompts]
    plain = BatchDecoder(Decoder(model, heads, load_tree("medusa16", 3)), slots=3, capacity=128, max_rows=20, draft_confidence=0.0)
    stats = [Stats() for _ in prompts]
    gens = [plain.steps(p, 30, SamplingConfig(), st) for p, st in zip(prompts, stats)]
    for g in gens:
        next(g)
    plain.step()  # three 16-node trees = 48 rows > 20: every sequence takes one plain step
    assert all(len(next(g)) == 1 for g in gens) and all(st.nodes == 1 for st in stats)
    for g in gens:
        g.close()
    roomy = BatchDecoder(Decoder(model, heads, load_tree("medusa16", 3)), slots=3, capacity=128, max_rows=20, draft_confidence=0.0)
    assert drive(roomy, reqs[:1], 30) == [hf_greedy(model, prompts[0], 30)]  # one tree fits: 16 rows
    assert drive(plain, reqs, 30) == [hf_greedy(model, p, 30) for p in prompts]


def test_the_tree_follows_the_batch_size_table_and_a_named_tree_does_not():
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    table = {1: load_tree("medusa16", 3), 3: Tree([[0]])}  # 2 sequences take the entry of 1, 3 the entry of 3
    batch = BatchDecoder(Decoder(model, heads, load_tree("chain2")), slots=3, capacity=128, batch_trees=table, draft_confidence=0.0)
    prompts = [list(range(10, 20)), list(range(40, 47)), list(range(90, 102))]
    stats = [Stats() for _ in prompts]
    gens = [batch.steps(prompts[0], 30, SamplingConfig(), stats[0])]
    next(gens[0])
    assert batch.step() == 1
    assert batch.step() == 0  # its tokens not handed out yet: nothing to decode
    assert stats[0].nodes == 17  # alone: the entry for 1 (16 drafts and the root)
    next(gens[0])
    gens.append(batch.steps(prompts[1], 30, SamplingConfig(), stats[1]))
    next(gens[1])
    assert batch.step() == 2
    assert stats[0].nodes == 34 and stats[1].nodes == 17  # two: still the entry for 1
    for g in gens:
        next(g)
    gens.append(batch.steps(prompts[2], 30, SamplingConfig(), stats[2], load_tree("chain3")))
    next(gens[2])
    batch.step()  # three: the entry for 3 (2 nodes) for those that follow the table, chain3 (4) for the named
    assert (stats[0].nodes, stats[1].nodes, stats[2].nodes) == (36, 19, 4)
    for g in gens:
        g.close()
    fresh = BatchDecoder(Decoder(model, heads, load_tree("chain2")), slots=3, capacity=128, batch_trees=table, draft_confidence=0.0)
    reqs = [(p, SamplingConfig(), None) for p in prompts]
    assert drive(fresh, reqs, 30) == [hf_greedy(model, p, 30) for p in prompts]


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_chunked_prefill_interleaves_with_running_sequences_and_stays_exact(chunk):
    model = tiny_model("qwen2")
    heads = tiny_heads(model, num_heads=3)
    batch = BatchDecoder(Decoder(model, heads, load_tree("medusa16", 3)), slots=2, capacity=128, prefill_chunk=chunk, draft_confidence=0.0)
    short, long = list(range(10, 14)), list(range(30, 53))  # 23 tokens: 23, 6 or 1 chunks
    running = batch.steps(short, 30, SamplingConfig(), Stats())
    out_short = []
    while not out_short:  # its own prefill, chunk by chunk, with nobody else to step
        out_short = list(next(running))
    joining = batch.steps(long, 30, SamplingConfig(), Stats())
    out_long, chunks = [], 0
    while not out_long:  # the joining prompt's prefill, a chunk per round; the running sequence goes on
        batch.step()
        out_short += next(running)
        out_long, chunks = list(next(joining)), chunks + 1
    assert chunks == -(-len(long) // chunk) and len(out_short) > chunks  # it got a step per chunk
    while len(out_long) < 30 or len(out_short) < 30:
        batch.step()
        out_short += next(running, [])
        out_long += next(joining, [])
    assert out_short[:30] == hf_greedy(model, short, 30) and out_long[:30] == hf_greedy(model, long, 30)


def test_heads_config_batch_trees_are_checked_and_loaded(tiny_dirs):
    import json

    from draftheads import load
    from draftheads.heads.medusa import HeadsConfig

    with pytest.raises(UserError, match="batch_trees must map batch sizes"):
        HeadsConfig.from_dict({"num_heads": 2, "hidden_size": 8, "vocab_size": 10, "batch_trees": {"eight": [[0]]}})
    bb, heads, _ = tiny_dirs
    cfg = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps({**cfg, "tree": [[0]], "batch_trees": {"1": [[0], [1]], "4": []}}))
    dm = load(heads=str(heads), backbone=str(bb))
    assert {b: t.size for b, t in dm.batch_trees.items()} == {1: 3, 4: 1}
    assert load(heads=str(heads), backbone=str(bb), tree="chain2").batch_trees == {}  # a named tree holds at every size


def test_heads_config_batch_cuts_are_checked_and_loaded(tiny_dirs):
    import json

    from draftheads import load
    from draftheads.heads.medusa import HeadsConfig

    base = {"num_heads": 2, "hidden_size": 8, "vocab_size": 10}
    for bad in ({"eight": 0.3}, {"8": 1.0}, {"8": -0.1}, {"8": "0.3"}, {"8": True}, [0.3]):
        with pytest.raises(UserError, match="batch_draft_confidence must map batch sizes"):
            HeadsConfig.from_dict({**base, "batch_draft_confidence": bad})
        with pytest.raises(UserError, match="device_trees must map"):
            HeadsConfig.from_dict({**base, "device_trees": {"cpu bfloat16": {"batch_draft_confidence": bad}}})
    bb, heads, _ = tiny_dirs
    cfg = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps({**cfg, "tree": [[0]], "batch_trees": {"1": [[0]], "4": [[0]]},
                                                   "batch_draft_confidence": {"4": 0.4}}))
    assert load(heads=str(heads), backbone=str(bb)).batch_cuts == {4: 0.4}
    assert load(heads=str(heads), backbone=str(bb)).decoder.min_prob == 0.0  # no cut for one sequence
    assert load(heads=str(heads), backbone=str(bb), tree="chain2").batch_cuts == {}  # a named tree is not cut
    (heads / "config.json").write_text(json.dumps({**cfg, "tree": [[0], [0, 0]], "batch_draft_confidence": {"1": 0.3}}))
    assert load(heads=str(heads), backbone=str(bb)).decoder.min_prob == 0.3  # the loop takes the cut for one
    assert load(heads=str(heads), backbone=str(bb), tree="chain2").decoder.min_prob == 0.0
    (heads / "config.json").write_text(json.dumps({**cfg, "device_trees": {"cpu bfloat16": {
        "tree": [[0]], "batch_trees": {"8": [[0]]}, "batch_draft_confidence": {"8": 0.5}}}}))
    assert load(heads=str(heads), backbone=str(bb), dtype=torch.bfloat16).batch_cuts == {8: 0.5}
    assert load(heads=str(heads), backbone=str(bb)).batch_cuts == {}  # fp32: the bf16 table's cuts do not apply


def test_served_round_costs_switch_table_followers_to_plain_rounds_and_stay_exact():
    """With a RoundCosts, each round asks it whether the table's trees pay at this batch size; a plain
    round verifies only the roots of the sequences that follow the table (a named tree keeps its tree),
    the round is recorded as what ran, and the outputs stay each sequence's greedy output alone."""
    from draftheads.round_costs import RoundCosts

    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    prompts = [list(range(10, 20)), list(range(40, 47)), list(range(90, 102))]
    costs = RoundCosts(warmup=2, explore_every=3)
    batch = BatchDecoder(Decoder(model, heads, load_tree("medusa8", 3)), slots=3, capacity=128, costs=costs, draft_confidence=0.0)
    stats = [Stats() for _ in prompts]
    gens = [batch.steps(p, 30, SamplingConfig(), st, tree) for p, st, tree in
            zip(prompts, stats, [None, None, load_tree("chain3")])]
    for g in gens:
        next(g)
    batch.step()  # warm-up round 1: the trees (9 nodes each for the two table followers)
    assert [st.nodes for st in stats] == [9, 9, 4]
    for g in gens:
        next(g)
    batch.step()  # warm-up round 2: plain for the table followers, chain3 still for the named one
    assert [st.nodes for st in stats] == [10, 10, 8]
    assert {k: r.rounds for k, r in costs.rates.items()} == {(3, True): 1, (3, False): 1}
    for g in gens:
        g.close()
    fresh = BatchDecoder(Decoder(model, heads, load_tree("medusa8", 3)), slots=3, capacity=128,
                         costs=RoundCosts(warmup=1, explore_every=2), draft_confidence=0.0)  # switches often
    reqs = [(p, SamplingConfig(), None) for p in prompts]
    assert drive(fresh, reqs, 30) == [hf_greedy(model, p, 30) for p in prompts]
    assert any(not trees for _, trees in fresh.costs.rates) and any(trees for _, trees in fresh.costs.rates)


def test_without_heads_or_with_a_one_node_table_there_is_nothing_to_decide():
    from draftheads.round_costs import RoundCosts

    model = tiny_model()
    for dec in (Decoder(model, None), Decoder(model, tiny_heads(model), Tree([]))):
        batch = BatchDecoder(dec, slots=2, capacity=64, costs=RoundCosts(), draft_confidence=0.0)
        drive(batch, [(list(range(5, 12)), SamplingConfig(), None)] * 2, 5)
        assert batch.costs.rounds == {}


def test_a_slot_keeps_room_for_its_largest_step_and_the_server_limit_says_the_same():
    """slot_context (what the server's prompt limit uses, before any BatchDecoder exists) equals the batch's
    own context: the slot minus the largest of the tree and the table's entries, plus lookup's branches;
    Hydra++ heads and models off the lean forward are refused by name."""
    from draftheads.batch import refusal, slot_context
    from draftheads.lookup import Hybrid, LookupConfig, PromptLookup

    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    table = {1: load_tree("medusa16", 3), 4: Tree([[0]])}
    dec = Decoder(model, heads, load_tree("chain2"))
    assert slot_context(dec, 128, table) == BatchDecoder(dec, 2, 128, batch_trees=table, draft_confidence=0.0).context == 128 - 17
    assert slot_context(dec, 128) == 128 - 3 and slot_context(Decoder(model, None), 128, table) == 127
    looked = Decoder(model, heads, load_tree("chain2"), PromptLookup(LookupConfig(branches=2, tokens=5)))
    assert isinstance(looked.drafter, Hybrid)
    assert slot_context(looked, 128, table) == BatchDecoder(looked, 2, 128, batch_trees=table, draft_confidence=0.0).context == 128 - 17 - 10
    assert refusal(dec) is None
    dec.lean = None
    assert "lean forward" in refusal(dec)


def test_round_costs_decide_for_a_two_node_table_and_only_for_table_followers():
    """The shipped fp32 table is [[0]] (2 nodes) at 1, 2 and 8 sequences: the decision must be made for it;
    a round whose sequences all named their own tree decides nothing; a recorded round's seconds are the
    round's own (a few ms on a tiny model, so its rate is high)."""
    import time

    from draftheads.round_costs import RoundCosts

    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    reqs = [(list(range(10, 20)), SamplingConfig(), None), (list(range(40, 47)), SamplingConfig(), None)]
    two = BatchDecoder(Decoder(model, heads, Tree([[0]])), slots=2, capacity=64, costs=RoundCosts(warmup=1), draft_confidence=0.0)
    start = time.perf_counter()
    drive(two, reqs, 12)
    wall = time.perf_counter() - start
    assert set(two.costs.rates) == {(2, True), (2, False)}
    assert all(0 < r.seconds <= wall for r in two.costs.rates.values())  # each round's own time, not t3 + t0
    named = BatchDecoder(Decoder(model, heads, Tree([[0]])), slots=2, capacity=64, costs=RoundCosts(), draft_confidence=0.0)
    drive(named, [(p, sp, load_tree("chain2")) for p, sp, _ in reqs], 12)
    assert named.costs.rounds == {}


def test_a_large_named_tree_beside_a_slot_near_its_end_waits_instead_of_overflowing():
    """Every slot of a pass gets as many rows as the largest tree: a 17-node named tree beside a sequence 1-3
    positions from its slot's end would write past it. That tree decodes plainly for such passes; both stay
    exact. Before: the pass asserted a KV-cache overflow."""
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    batch = BatchDecoder(Decoder(model, heads, load_tree("chain2")), slots=2, capacity=64, draft_confidence=0.0)
    prompts = [list(range(10, 50)), list(range(60, 70))]
    reqs = [(prompts[0], SamplingConfig(), None), (prompts[1], SamplingConfig(), load_tree("medusa16", 3))]
    assert drive(batch, reqs, 21) == [hf_greedy(model, p, 21) for p in prompts]


def test_a_finished_sequence_not_yet_handed_out_does_not_block_the_others():
    """A sequence that filled its slot (length = capacity) and whose tokens its consumer has not taken yet
    still lies inside the pass: its slot is released at once, so the others step on and stay exact."""
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    batch = BatchDecoder(Decoder(model, heads, load_tree("chain2")), slots=2, capacity=48, draft_confidence=0.0)
    full = batch.steps(list(range(10, 50)), 100, SamplingConfig(), Stats())
    out = list(next(full))
    while True:
        batch.step()
        if batch.seqs[0].done:
            break  # its last tokens wait for its consumer
        out += next(full)
    assert batch.seqs[0].done and int(batch.cache.lengths[0]) == 0  # spent, released before steps() ends
    other = batch.steps(list(range(60, 70)), 12, SamplingConfig(), Stats())
    got = list(next(other))
    for _ in range(12):
        batch.step()
        got += next(other, [])
    assert got[:12] == hf_greedy(model, list(range(60, 70)), 12)
    out += next(full)
    assert out == hf_greedy(model, list(range(10, 50)), len(out)) and 40 + len(out) >= 48 - 3
    assert next(full, None) is None and sorted(batch.free) == [0]


def test_a_named_tree_runs_exactly_while_every_slot_has_room_for_it():
    """The bound of the waiting rule: B's 17-node tree runs in a pass whenever every slot has >= 17 free
    columns (room == 17 included) and waits otherwise."""
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    batch = BatchDecoder(Decoder(model, heads, load_tree("chain2")), slots=2, capacity=64, draft_confidence=0.0)
    a = batch.steps(list(range(10, 55)), 100, SamplingConfig(), Stats())  # 45 tokens: room 19 at the start
    b_stats = Stats()
    b = batch.steps(list(range(60, 64)), 100, SamplingConfig(), b_stats, load_tree("medusa16", 3))
    next(a), next(b)
    rooms = []
    while 0 in batch.seqs and not batch.seqs[0].done and int(batch.cache.lengths[1]) + 17 <= batch.seqs[1].end:
        room, nodes = 64 - int(batch.cache.lengths.max()), b_stats.nodes
        batch.step()
        assert (b_stats.nodes - nodes == 17) == (room >= 17), (room, b_stats.nodes - nodes)
        rooms.append(room)
        next(a), next(b)
    assert 17 in rooms and 16 in rooms, rooms  # both sides of the bound were stepped
    a.close(), b.close()


def test_draft_many_gives_each_row_what_draft_gives_it():
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    tree = load_tree("medusa16", 3)
    g = torch.Generator().manual_seed(5)
    hidden, roots = torch.randn(5, model.config.hidden_size, generator=g), torch.arange(5)
    many = heads.draft_many(hidden, roots, tree)  # [5, nodes]
    assert many.shape == (5, tree.size) and many[:, 0].tolist() == list(range(5))
    for i in range(5):
        assert torch.equal(many[i], heads.draft(hidden[i], roots[i], tree))


def _packed_heads(monkeypatch, activations: str, num_heads: int):
    """(model, heads whose weights are Q8_0 values, so that they pack, the list of what each _packed_top call returned,
    the unwrapped _packed_top) under `activations`."""
    monkeypatch.setattr(few_rows, "_ACTIVATIONS", activations)
    model = tiny_model()
    heads = tiny_heads(model, num_heads=num_heads)
    with torch.no_grad():
        for m in heads.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(few_rows.q8_0_rounded(m.weight))
    calls = []
    packed_top = heads._packed_top
    monkeypatch.setattr(heads, "_packed_top", lambda *a: calls.append(packed_top(*a)) or calls[-1])
    return model, heads, calls, packed_top


@pytest.mark.skipif(few_rows.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")
@pytest.mark.parametrize("activations", ["int8", "float32"])
def test_packed_heads_draft_a_lone_sequence_in_one_call_with_the_same_ids(monkeypatch, activations):
    """Heads whose weights pack (Q8_0 values, as round_drafter_weights leaves the shipped ones) draft one sequence
    in one C++ call (few_rows.heads_top): the same products, silu and top-k as the per-op path, so the same ids
    (draft_many's), on trees of several depths and ranks, through VocabTrim's id map; heads that do not pack,
    or a product that needs gradients, take the per-op path."""
    model, heads, calls, packed_top = _packed_heads(monkeypatch, activations, 3)
    monkeypatch.setattr(heads, "vocab_map", torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(9)
    hidden, roots = torch.randn(6, model.config.hidden_size, generator=g), torch.arange(6)
    for tree in (load_tree("medusa16", 3), Tree([[0]]), Tree([[0], [1], [0, 0], [0, 0, 0]]), Tree([[0], [1], [2]])):
        many = heads.draft_many(hidden, roots, tree)  # [6, nodes], the per-op path
        for i in range(6):
            assert torch.equal(heads.draft(hidden[i], roots[i], tree), many[i]), (tree, i)
    assert calls and all(c is not None for c in calls)
    # draft_confident alone takes the same call and keeps the nodes the per-op path keeps for the row in a batch, at
    # cuts between nodes and exactly on one node's path probability (kept: >=; node [0, 0]'s is its parent's times its own)
    tree = Tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    prob = heads._draft_many(hidden, roots, tree, True)[1]  # [6, nodes - 1], node [0] in column 0, [0, 0] in 2
    # a depth-2 node whose float32 path product rounded up: a product taken in float64 falls below it and cuts the node
    pairs = [(i, a, b) for i in range(6) for a, b in [(0, 2), (0, 3), (1, 4)]]  # parent's column, node's: [0, 0], [0, 1], [1, 0]
    row, parent, col = next((i, a, b) for i, a, b in pairs if float(prob[i, a]) * float(prob[i, b]) < float(prob[i, a] * prob[i, b]))
    up = float(prob[row, parent] * prob[row, col])
    sizes = set()
    for min_prob in [0.0, float(prob.median()), float(prob.max()), up]:
        calls.clear()
        batch = heads.draft_confident(hidden, roots, tree, min_prob)  # six rows: the per-op path
        assert calls == []
        for i in range(6):
            cut, ids = heads.draft_confident(hidden[i:i + 1], roots[i:i + 1], tree, min_prob)[0]
            assert cut is batch[i][0] and torch.equal(ids, batch[i][1]), (min_prob, i)
            sizes.add(cut.size)
        assert len(calls) == 6 and all(c is not None for c in calls)
    assert len(sizes) >= 3  # whole trees, cut ones and bare roots
    assert tree.paths[col] in heads.draft_confident(hidden, roots, tree, up)[row][0].paths  # its path reaches the cut: kept
    with torch.enable_grad():
        assert packed_top(hidden[:1], 1, 1) is None  # gradients: the per-op path
    calls.clear()
    with torch.no_grad():
        heads.lm_heads[1].weight.add_(1e-3)  # no longer Q8_0 values: it does not pack
    tree = Tree([[0], [0, 0]])
    assert torch.equal(heads.draft(hidden[0], roots[0], tree), heads.draft_many(hidden[:1], roots[:1], tree)[0])
    assert calls == [None]


@pytest.mark.skipif(few_rows.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")
def test_packed_heads_draft_follows_weights_written_or_replaced(monkeypatch):
    """The one-call draft keeps its packed argument lists between steps (MedusaHeads._top_args): a weight written in
    place (a training step) or a parameter replaced (load_state_dict(assign=True)) drafts its new ids, the per-op
    path's, not the old packing's."""
    model, heads, calls, _ = _packed_heads(monkeypatch, "int8", 2)
    g = torch.Generator().manual_seed(4)
    new_q8 = lambda w: few_rows.q8_0_rounded(torch.randn(w.shape, generator=g) * w.abs().max())  # noqa: E731
    hidden, roots = torch.randn(4, model.config.hidden_size, generator=g), torch.arange(4)
    tree = Tree([[0], [1], [0, 0], [0, 1]])

    def drafts():
        out = torch.stack([heads.draft(hidden[i], roots[i], tree) for i in range(4)])
        assert torch.equal(out, heads.draft_many(hidden, roots, tree))
        return out

    first = drafts()
    with torch.no_grad():
        heads.lm_heads[0].weight.copy_(new_q8(heads.lm_heads[0].weight))
    written = drafts()
    heads.blocks[1][0].linear.weight = torch.nn.Parameter(new_q8(heads.blocks[1][0].linear.weight))
    replaced = drafts()
    assert not torch.equal(first[:, 1:3], written[:, 1:3]) and not torch.equal(written[:, 3:], replaced[:, 3:])
    assert len(calls) == 12 and all(c is not None for c in calls)


def test_sequences_on_the_same_tree_draft_in_one_heads_call(monkeypatch):
    """The table's followers draft together (one product per head for all of them); a sequence with a
    tree of its own drafts apart; output is unchanged."""
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    calls = []
    real, alone = heads.draft_many, heads.draft
    monkeypatch.setattr(heads, "draft_many", lambda h, r, t: calls.append((h.shape[0], t.size)) or real(h, r, t))
    monkeypatch.setattr(heads, "draft", lambda h, r, t: calls.append((1, t.size)) or alone(h, r, t))
    batch = BatchDecoder(Decoder(model, heads, load_tree("medusa16", 3)), slots=4, capacity=128, draft_confidence=0.0)
    prompts = [list(range(10, 20)), list(range(40, 47)), list(range(90, 102)), list(range(60, 66))]
    trees = [None, None, None, load_tree("chain3")]
    got = drive(batch, [(p, SamplingConfig(), t) for p, t in zip(prompts, trees)], 24)
    assert got == [hf_greedy(model, p, 24) for p in prompts]
    table, own = load_tree("medusa16", 3).size, load_tree("chain3").size
    assert (3, table) in calls and (1, own) in calls and all(n <= 3 for n, size in calls if size == table)


def test_a_two_node_table_tree_drafts_in_one_heads_call_too(monkeypatch):
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    calls = []
    real = heads.draft_many
    monkeypatch.setattr(heads, "draft_many", lambda h, r, t: calls.append((h.shape[0], t.size)) or real(h, r, t))
    batch = BatchDecoder(Decoder(model, heads, Tree([[0]])), slots=3, capacity=128, draft_confidence=0.0)
    prompts = [list(range(10, 20)), list(range(40, 47)), list(range(90, 102))]
    assert drive(batch, [(p, SamplingConfig(), None) for p in prompts], 12) == [hf_greedy(model, p, 12) for p in prompts]
    assert (3, 2) in calls


# ---------------------------------------------------------------- trees cut to the confident nodes, packed rows

def test_a_cut_tree_keeps_the_chosen_nodes_in_order_and_is_built_once():
    t = Tree([[0], [1], [0, 0], [0, 1], [1, 0]])  # nodes 1-5 in this order
    keep = (True, True, False, True, False, False)  # the root, [0] and [0, 0]
    cut = t.cut(keep)
    assert cut.paths == [(0,), (0, 0)] and cut.parent == [-1, 0, 1]
    assert t.cut(keep) is cut and t.cut((True,) * 6) is t
    with pytest.raises(AssertionError):
        t.cut((True, False, True, True, False, False))  # [0, 0] kept without its parent [0]
    with pytest.raises(AssertionError):
        t.cut((False,) + (True,) * 5)  # the root is always verified


def test_draft_confident_keeps_the_nodes_whose_path_probability_reaches_the_threshold():
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    tree = load_tree("medusa16", 3)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, model.config.hidden_size, generator=g)
    roots = torch.randint(0, 200, (6,), generator=g)
    ids = heads.draft_many(hidden, roots, tree)  # [6, 17]
    probs = heads(hidden, tree.depth).softmax(-1)  # [3, 6, vocab]: tiny heads keep the whole vocabulary
    path = torch.ones(6, tree.size)
    for node in range(1, tree.size):  # the product of the heads' probabilities from the root down
        k = len(tree.paths[node - 1]) - 1
        path[:, node] = path[:, tree.parent[node]] * probs[k, torch.arange(6), ids[:, node]]
    values = path[:, 1:].flatten().sort().values
    mid = values.numel() // 2  # halfway between two middle values: no node sits on the threshold, where
    threshold = float(values[mid - 1:mid + 1].mean())  # a rounding difference of the two computations would decide
    assert values[mid - 1] < threshold < values[mid]
    plans = heads.draft_confident(hidden, roots, tree, threshold)
    sizes = []
    for b, (cut, cands) in enumerate(plans):
        keep = (path[b] >= threshold).tolist()
        assert cut.paths == [p for p, k in zip(tree.paths, keep[1:]) if k]
        assert cands.tolist() == [i for i, k in zip(ids[b].tolist(), keep) if k]
        sizes.append(cut.size)
    assert min(sizes) < max(sizes)  # the threshold cut some sequences more than others
    assert all(cut is tree and torch.equal(c, i) for (cut, c), i in zip(heads.draft_confident(hidden, roots, tree, 0.0), ids))


def test_calibrate_predicts_the_rows_draft_confident_keeps():
    """calibrate scores the batched step's cut from the heads' teacher probabilities (cut_rows_tokens);
    on the same hidden states it counts the rows draft_confident keeps."""
    from draftheads.calibrate import MISS, cut_rows_tokens

    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    tree = load_tree("medusa16", 3)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(32, model.config.hidden_size, generator=g)
    ids, probs = heads.teacher_top_probs(hidden)  # [3, 32, 10] each
    assert torch.equal(ids, heads.teacher_topk(hidden, None))
    probs = probs.transpose(0, 1)  # [32, 3, 10]
    path = sorted({float(probs[:, torch.arange(len(q)), torch.tensor(q)].prod(-1)[t]) for q in tree.paths for t in range(32)})
    threshold = (path[len(path) // 2] + path[len(path) // 2 + 1]) / 2  # between two path values: no rounding tie
    plans = heads.draft_confident(hidden, torch.zeros(32, dtype=torch.long), tree, threshold)
    ranks = torch.full((32, 3), MISS)
    rows, tokens = cut_rows_tokens(ranks, probs, tree.paths, threshold)
    assert rows == pytest.approx(sum(cut.size for cut, _ in plans) / 32) and tokens == 1.0
    assert 1 < rows < tree.size


def test_a_node_whose_path_probability_equals_the_threshold_is_kept():
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    for lm in heads.lm_heads:  # logits hundreds apart: each head's top token gets probability exactly 1.0
        lm.weight.data *= 1e4
    tree = load_tree("chain3")
    hidden, roots = torch.randn(2, model.config.hidden_size), torch.tensor([3, 4])
    assert all(cut is tree for cut, _ in heads.draft_confident(hidden, roots, tree, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_compute_what_the_padded_pass_computes(dtype):
    """The projections and MLP run on the real rows only: each real row's hidden state and the keys it
    writes are what the padded pass gives it (bit for bit in bf16, whose products are row-count exact)."""
    from draftheads.kvcache import SlotKVCache
    from draftheads.llama_forward import LlamaForward

    model = tiny_model().to(dtype)
    fwd = LlamaForward(model)
    g = torch.Generator().manual_seed(4)
    caches = [SlotKVCache.for_model(model, 3, 64) for _ in range(2)]
    for slot, n in enumerate((7, 12, 4)):
        prompt = torch.randint(0, 200, (n,), generator=g)
        for cache in caches:
            fwd.prefill_slot(cache, slot, prompt)
    q, sizes = 3, (3, 1, 2)  # a chain of 3, a plain row, a chain of 2: 6 real rows of 9
    ids = torch.randint(0, 200, (3, q), generator=g)
    positions = caches[0].lengths[:, None] + torch.arange(q)
    rows = torch.cat([torch.arange(n) + s * q for s, n in enumerate(sizes)])
    chains = {s: tuple(range(-1, n - 1)) for s, n in enumerate(sizes)}
    out = []
    for cache, packed in zip(caches, (None, rows)):
        cache.begin_step(3, q)
        if dtype == torch.float32:
            bias = torch.full((3, q, q), torch.finfo(dtype).min, dtype=dtype)
            bias.diagonal(dim1=1, dim2=2).zero_()
            for s, n in enumerate(sizes):
                bias[s, :n, :n] = Tree([[0] * d for d in range(1, n)]).tensors("cpu", dtype).tree_bias
            h = fwd.hidden(cache, ids, positions, cache.tree_mask(bias), None, packed)
        else:
            h = fwd.hidden(cache, ids, positions, None, chains, packed)
        out.append(h.view(3 * q, -1)[rows])
    if dtype == torch.bfloat16:
        assert torch.equal(out[0], out[1])
        for s, n in enumerate(sizes):  # the kept keys too
            assert torch.equal(caches[0].kv[:, :, s, :, :int(caches[0].lengths[s]) + n],
                               caches[1].kv[:, :, s, :, :int(caches[1].lengths[s]) + n])
    else:
        torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_a_batch_cuts_trees_to_their_confident_nodes_and_stays_exact():
    """With draft_confidence, table followers in a pass of several sequences verify only their confident
    nodes (fewer than their trees'), a sequence alone keeps its whole tree, and every output is still
    plain greedy decoding's."""
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    tree = load_tree("medusa16", 3)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (6, 14, 9)]
    batch = BatchDecoder(Decoder(model, heads, tree), slots=3, capacity=128, draft_confidence=0.05)
    stats = [Stats() for _ in prompts]
    gens = [batch.steps(p, 30, SamplingConfig(), s) for p, s in zip(prompts, stats)]
    out = [list(next(gen)) for gen in gens]
    for _ in range(6):
        assert batch.step() == 3
        for o, gen in zip(out, gens):
            o += next(gen)
    nodes = sum(s.nodes for s in stats)
    assert 3 * 6 < nodes < 3 * 6 * tree.size  # some nodes kept, some cut
    for o, p in zip(out, prompts):
        assert o == hf_greedy(model, p, len(o))
    for gen in gens[1:]:
        gen.close()
    before = stats[0].nodes
    assert batch.step() == 1
    assert stats[0].nodes - before == tree.size  # alone: the whole tree
    gens[0].close()


def test_one_sequence_cuts_its_tree_where_calibrate_chose_a_cut_for_one_and_stays_exact():
    """A cut for one sequence (min_prob of the loop, draft_confidence {1: ...} of the batched step): the loop and a
    sequence alone in the batched step verify fewer nodes than the tree has, a tree named per call is verified
    whole, and the output is still plain greedy decoding's."""
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    tree = load_tree("chain3", 3)
    prompt = [5, 9, 2, 7, 4, 11]
    want = hf_greedy(model, prompt, 24)
    whole, cut = Stats(), Stats()
    out = [t for step in Decoder(model, heads, tree).steps(prompt, 24, SamplingConfig(), whole) for t in step][:24]
    assert out == want
    loop = Decoder(model, heads, tree, min_prob=0.05)
    out = [t for step in loop.steps(prompt, 24, SamplingConfig(), cut) for t in step][:24]
    # some nodes kept, some cut (the steps near the cache's end verify the root alone either way)
    assert out == want and cut.steps < cut.nodes < whole.nodes * cut.steps / whole.steps
    named = Stats()
    out = [t for step in loop.steps(prompt, 24, SamplingConfig(), named, load_tree("chain3", 3)) for t in step][:24]
    assert out == want and (named.steps, named.nodes) == (whole.steps, whole.nodes)  # a tree named per call: whole
    batch = BatchDecoder(Decoder(model, heads, tree), slots=2, capacity=128, draft_confidence={1: 0.05, 2: 0.0})
    stats = [Stats(), Stats()]
    gens = [batch.steps(prompt, 40, SamplingConfig(), stats[0]), batch.steps([3, 8, 1], 40, SamplingConfig(), stats[1])]
    passes(batch, gens, 4)
    assert [s.nodes for s in stats] == [4 * tree.size] * 2  # two sequences: whole chains (their cut is 0)
    gens[1].close()
    before = stats[0].nodes
    for _ in range(6):
        assert batch.step() == 1
        next(gens[0])
    assert 6 < stats[0].nodes - before < 6 * tree.size  # alone: its cut for one
    gens[0].close()


def passes(batch: BatchDecoder, gens, n: int) -> None:
    """Prefill every sequence of `gens` (BatchDecoder.steps generators), then run `n` passes over all of them."""
    for gen in gens:
        next(gen)
    for _ in range(n):
        assert batch.step() == len(gens)
        for gen in gens:
            next(gen)


def test_the_cut_follows_the_batch_size():
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    tree = load_tree("medusa16", 3)
    batch = BatchDecoder(Decoder(model, heads, tree), slots=3, capacity=128, draft_confidence={2: 0.0, 3: 0.99})
    assert [batch.confidence_at(b) for b in (1, 2, 3, 8)] == [0.0, 0.0, 0.99, 0.99]
    assert BatchDecoder(Decoder(model, heads, tree), 2, 64, draft_confidence={4: 0.3}).confidence_at(2) == BATCH_DRAFT_CONFIDENCE
    assert BatchDecoder(Decoder(model, heads, tree), 2, 64, draft_confidence=0.3).confidence_at(8) == 0.3
    assert BatchDecoder(Decoder(model, heads, tree), 2, 64, draft_confidence=0.3).confidence_at(1) == 0.0  # 2+ only
    one = BatchDecoder(Decoder(model, heads, tree), 2, 64, draft_confidence={1: 0.05, 4: 0.3})
    assert [one.confidence_at(b) for b in (1, 2, 4)] == [0.05, BATCH_DRAFT_CONFIDENCE, 0.3]  # 1's cut is one sequence's
    stats = [Stats() for _ in range(3)]
    gens = [batch.steps([5 + i, 6, 7, 8], 40, SamplingConfig(), s) for i, s in enumerate(stats)]
    passes(batch, gens, 2)
    assert all(s.nodes < 2 * tree.size for s in stats)  # 3 sequences: cut at 0.99 (the tiny heads are never that sure)
    gens[2].close()
    before = [s.nodes for s in stats[:2]]
    assert batch.step() == 2
    assert [s.nodes - b for s, b in zip(stats, before)] == [tree.size, tree.size]  # 2 sequences: whole trees
    for gen in gens[:2]:
        gen.close()


def test_a_tree_the_request_names_is_not_cut():
    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    named = load_tree("medusa16", 3)
    batch = BatchDecoder(Decoder(model, heads, load_tree("medusa16", 3)), slots=2, capacity=128, draft_confidence=0.9)
    stats = [Stats(), Stats()]
    gens = [batch.steps([5, 6, 7, 8], 20, SamplingConfig(), stats[0], named),
            batch.steps([9, 10, 11], 20, SamplingConfig(), stats[1])]
    passes(batch, gens, 3)
    assert stats[0].nodes == 3 * named.size  # named: whole every pass
    assert stats[1].nodes < 3 * named.size  # the table's follower: cut at 0.9
    for gen in gens:
        gen.close()


def test_a_plain_table_entry_drafts_nothing_unless_prompt_lookup_may_branch(monkeypatch):
    """Where the table says plain (a one-node tree), the heads are not asked for drafts; prompt lookup still
    is, as it hangs branches on the root alone. Both stay exact."""
    from draftheads.lookup import Hybrid, LookupConfig, PromptLookup

    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    table = {1: load_tree("medusa16", 3), 2: Tree([])}
    calls = []
    real = Hybrid.propose
    monkeypatch.setattr(Hybrid, "propose", lambda self, h, r, t, **kw: calls.append((self.lookup is not None, t.size)) or real(self, h, r, t, **kw))
    prompts = [list(range(10, 20)) * 2, list(range(40, 47)) * 3]  # repeats: lookup finds matches
    reqs = [(p, SamplingConfig(), None) for p in prompts]
    for lookup in (None, PromptLookup(LookupConfig(branches=2, tokens=3))):
        dec = Decoder(model, heads, load_tree("chain2"), lookup)
        batch = BatchDecoder(dec, slots=2, capacity=128, batch_trees=table, draft_confidence=0.0)
        assert drive(batch, reqs, 20) == [hf_greedy(model, p, 20) for p in prompts]
    assert (True, 1) in calls and (False, 1) not in calls  # plain passes: only lookup is asked


def test_in_a_batched_pass_lookup_s_branches_fit_each_sequence_s_share_of_rows(monkeypatch):
    """A pass of B >= 2 sequences gives each BATCH_LOOKUP_ROWS // B rows (its tree's included): lookup's branches are cut
    to fit (uncut, 2 branches of 5 tokens made a round of 8 sequences cost 2.4x a plain one). A sequence alone in the
    batch keeps them whole, as the serial loop does. Outputs stay greedy either way."""
    from draftheads import batch as batch_module
    from draftheads.lookup import Hybrid, LookupConfig, PromptLookup

    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    table = {1: Tree([]), 2: Tree([])}
    prompts = [list(range(10, 20)) * 3, list(range(40, 47)) * 4]  # repeats: lookup finds matches
    monkeypatch.setattr(batch_module, "BATCH_LOOKUP_ROWS", 8)  # 4 rows a sequence at 2
    sizes, real = [], Hybrid.propose  # (the node budget asked, the step tree's size) per proposal

    def recording(*args, **kw):
        out = real(*args, **kw)
        sizes.append((kw.get("max_nodes"), out[0].size))
        return out

    monkeypatch.setattr(Hybrid, "propose", recording)
    dec = Decoder(model, heads, load_tree("chain2"), PromptLookup(LookupConfig(branches=2, tokens=5)))
    batch = BatchDecoder(dec, slots=2, capacity=128, batch_trees=table, draft_confidence=0.0)
    assert drive(batch, [(p, SamplingConfig(), None) for p in prompts], 20) == [hf_greedy(model, p, 20) for p in prompts]
    assert sizes and all(cap == 4 and size <= 4 for cap, size in sizes) and max(size for _, size in sizes) == 4
    sizes.clear()
    monkeypatch.setattr(batch_module, "BATCH_LOOKUP_ROWS", 2)  # 1 row a sequence at 2: no room, nothing to draft
    full = BatchDecoder(dec, slots=2, capacity=128, batch_trees=table, draft_confidence=0.0)
    assert drive(full, [(p, SamplingConfig(), None) for p in prompts], 20) == [hf_greedy(model, p, 20) for p in prompts]
    assert all(cap is None for cap, _ in sizes)  # only the passes where one sequence ran alone asked
    sizes.clear()
    alone = BatchDecoder(dec, slots=2, capacity=128, batch_trees=table, draft_confidence=0.0)
    assert drive(alone, [(prompts[0], SamplingConfig(), None)], 20) == [hf_greedy(model, prompts[0], 20)]
    assert all(cap is None for cap, _ in sizes) and max(size for _, size in sizes) > 4


def test_lookup_on_a_plain_entry_must_win_by_the_margin_the_table_s_trees_need_not():
    """The served rounds take lookup's branches on a plain table entry only where they beat plain by LOOKUP_MARGIN
    (the table chose plain there); a tree the table gives needs only to tie. Outputs stay greedy."""
    from draftheads import batch as batch_module
    from draftheads.lookup import LookupConfig, PromptLookup
    from draftheads.round_costs import RoundCosts

    asked = []

    class Recording(RoundCosts):
        def use_trees(self, batch, margin=1.0):
            asked.append(margin)
            return super().use_trees(batch, margin)

    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    prompts = [list(range(10, 20)) * 2, list(range(40, 47)) * 3]  # repeats: lookup finds matches
    reqs = [(p, SamplingConfig(), None) for p in prompts]
    assert batch_module.LOOKUP_MARGIN > 1
    for table, margin in (({1: Tree([]), 2: Tree([])}, batch_module.LOOKUP_MARGIN), ({1: Tree([[0]]), 2: Tree([[0]])}, 1.0)):
        asked.clear()
        dec = Decoder(model, heads, load_tree("chain2"), PromptLookup(LookupConfig(branches=2, tokens=3)))
        batch = BatchDecoder(dec, slots=2, capacity=128, batch_trees=table, costs=Recording(warmup=1), draft_confidence=0.0)
        assert drive(batch, reqs, 12) == [hf_greedy(model, p, 12) for p in prompts]
        assert asked and set(asked) == {margin}


def test_served_rounds_decide_prompt_lookup_on_a_plain_table_entry(monkeypatch):
    """Lookup's branches hang on a plain table entry too, and every sequence's branches pad the pass: with a
    RoundCosts the served rounds decide them as they decide trees. Rounds that take the plain kind ask no
    drafter; both kinds are recorded and the outputs stay greedy."""
    from draftheads.lookup import Hybrid, LookupConfig, PromptLookup
    from draftheads.round_costs import RoundCosts

    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    table = {1: load_tree("medusa16", 3), 2: Tree([])}
    prompts = [list(range(10, 20)) * 2, list(range(40, 47)) * 3]  # repeats: lookup finds matches
    reqs = [(p, SamplingConfig(), None) for p in prompts]
    dec = Decoder(model, heads, load_tree("chain2"), PromptLookup(LookupConfig(branches=2, tokens=3)))
    batch = BatchDecoder(dec, slots=2, capacity=128, batch_trees=table, costs=RoundCosts(warmup=1), draft_confidence=0.0)
    asked = []
    real_step, real_propose = BatchDecoder.step, Hybrid.propose
    rounds = []
    monkeypatch.setattr(Hybrid, "propose", lambda self, h, r, t, **kw: asked.append(t.size) or real_propose(self, h, r, t, **kw))
    monkeypatch.setattr(BatchDecoder, "step", lambda self: rounds.append(len(asked)) or real_step(self))
    assert drive(batch, reqs, 20) == [hf_greedy(model, p, 20) for p in prompts]
    assert set(batch.costs.rates) == {(2, True), (2, False)}
    # the warm-up alternates from a lookup round: the next round, plain, asks no drafter
    assert rounds[1] - rounds[0] == 2 and rounds[2] - rounds[1] == 0
    plain_only = BatchDecoder(Decoder(model, heads, load_tree("chain2")), slots=2, capacity=128, batch_trees=table,
                              costs=RoundCosts(warmup=1), draft_confidence=0.0)
    drive(plain_only, reqs, 8)
    assert plain_only.costs.rounds == {}  # no lookup and a plain entry: nothing to decide
