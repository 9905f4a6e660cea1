"""Prompt lookup: the n-gram matcher on exact contexts, trees with given nodes, the hybrid step tree,
and the loop with lookup alone and with heads (greedy output and KV cache equal plain decoding's)."""

import pytest
import torch
from transformers import DynamicCache

import draftheads
from bench_fixtures import tiny_dirs  # noqa: F401  (fixture)
from draftheads.acceptance import SamplingConfig
from draftheads.calibrate import lookup_depths, lookup_summary, with_lookup
from draftheads.cli import main
from draftheads.errors import UserError
from draftheads.generate import Decoder, Stats
from draftheads.kvcache import TreeKVCache, cache_keyword
from draftheads.lookup import Hybrid, LookupConfig, PromptLookup, hang, lookup_config
from draftheads.tree import MEDUSA63, Tree, load_tree
from tiny import ARCHS, tiny_heads, tiny_model

# ------------------------------------------------------------------------------------- the matcher


def lookup_on(context, **cfg) -> PromptLookup:
    lk = PromptLookup(LookupConfig(**cfg))
    lk.observe(None, torch.tensor(context))
    return lk


def test_longest_match_first_then_most_recent_occurrence():
    ctx = [1, 2, 3, 10, 11, 12, 9, 2, 3, 20, 21, 22, 4, 3, 30, 31, 1, 2]
    lk = lookup_on(ctx, max_ngram=3, min_ngram=1, branches=3, tokens=3)
    # root 3: (1 2 3) once -> 10 11 12; (2 3) twice, the later first -> 20 21 22 (the earlier one repeats
    # 10 11 12); (3) most recently at 13 -> 30 31 1
    assert lk.branches(3) == [[10, 11, 12], [20, 21, 22], [30, 31, 1]]
    assert lookup_on(ctx, max_ngram=3, min_ngram=1, branches=2, tokens=3).branches(3) == [[10, 11, 12], [20, 21, 22]]
    assert lookup_on(ctx, max_ngram=2, min_ngram=2, branches=3, tokens=2).branches(3) == [[20, 21], [10, 11]]


def test_no_match_gives_no_branch():
    lk = lookup_on([1, 2, 3, 4, 5], max_ngram=3, min_ngram=2)
    assert lk.branches(9) == [] and lk.branches(1) == []  # (5 1) never occurred
    assert lookup_on([1, 2, 3, 4, 5], min_ngram=1).branches(3) == [[4, 5, 3, 4, 5]]  # one token is enough at min_ngram 1
    assert PromptLookup().branches(3) == []  # empty context


def test_overlapping_match_copies_on_through_the_root():
    # "1 2 1 2 1" + root 2: (2 1 2) ended at position 4; the copy runs into the root and then into itself
    assert lookup_on([1, 2, 1, 2, 1], min_ngram=1, branches=3, tokens=5).branches(2) == [[1, 2, 1, 2, 1]]
    assert lookup_on([5, 5, 5], min_ngram=1, tokens=4).branches(5) == [[5, 5, 5, 5]]


def test_a_repeated_continuation_is_one_branch():
    ctx = [7, 8, 1, 2, 3, 0, 7, 8, 1, 2, 3, 5, 7, 8, 4, 5, 6, 0, 7]
    # root 8: (7 8) occurred three times; the two oldest continue alike
    assert lookup_on(ctx, max_ngram=2, min_ngram=2, branches=3, tokens=3).branches(8) == [[4, 5, 6], [1, 2, 3]]


def test_lookup_settings():
    assert lookup_config(None) is None and lookup_config(False) is None
    assert lookup_config(True) == LookupConfig() and lookup_config({"tokens": 3}).tokens == 3
    with pytest.raises(UserError):
        lookup_config({"min_ngram": 4, "max_ngram": 3})
    with pytest.raises(UserError):
        lookup_config({"nope": 1})


def test_teacher_topk_is_the_branches_at_each_position():
    seq = torch.tensor([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 9])
    lk = PromptLookup(LookupConfig(tokens=3, branches=2))
    top = lk.teacher_topk(None, seq, 4)  # [K=3, T, 4]
    assert top.shape == (3, 11, 4)
    assert top[:, 6, 0].tolist() == [4, 5, 1] and (top[:, 6, 1:] == -1).all()  # (1 2) + root 3 -> 4 5 1
    assert (top[:, :5] == -1).all() and (top[:, 10] == -1).all()  # no match yet; no root after the last


# --------------------------------------------------------------------------- trees with given nodes

def test_given_nodes_come_after_the_ranked_ones_which_keep_their_indices():
    ranked = load_tree("medusa16", 3)
    tree = ranked.with_given([(-1,), (-1, -1), (0, -1), (0, 0, -1)])
    assert tree.paths[:ranked.size - 1] == ranked.paths and tree.ranked_size == ranked.size
    assert tree.size == ranked.size + 4 and tree.given == [False] * ranked.size + [True] * 4
    assert tree.ranked.paths == ranked.paths and tree.topk == ranked.topk
    assert ranked.with_given([(0, 0, -1), (0, -1), (-1, -1), (-1,)]) is tree  # cached by shape
    assert ranked.with_given([]) is ranked
    tt, rt = tree.tensors("cpu", torch.float32), ranked.tensors("cpu", torch.float32)
    assert torch.equal(tt.head_of, rt.head_of) and torch.equal(tt.rank_of, rt.rank_of)
    # the chain below the root: (-1, -1) sees the root, (-1,) and itself only
    chain2 = tree.index[(-1, -1)]
    assert (tt.tree_bias[chain2] == 0).nonzero().view(-1).tolist() == [0, tree.index[(-1,)], chain2]
    assert tt.depths[tree.index[(0, 0, -1)]] == 3


def test_published_trees_load_unchanged_and_given_paths_are_checked():
    with pytest.raises(UserError):
        Tree([[-1]])  # a user's tree holds ranks only
    with pytest.raises(UserError):
        Tree([[0]], given=[(0, 1)])  # a given path needs a given element
    with pytest.raises(UserError):
        Tree([[0]], given=[(-1, 0)])  # no ranked node below a given one
    with pytest.raises(UserError):
        Tree([[0]], given=[(1, -1)])  # its ranked parent must exist
    m63 = Tree(MEDUSA63)  # Medusa's order: by (depth, path)
    assert m63.paths == sorted(map(tuple, MEDUSA63), key=lambda p: (len(p), p)) and m63.given == [False] * 64


class FixedHeads:
    def __init__(self, ids):
        self.ids = torch.tensor(ids)

    def reset(self):
        pass

    def observe(self, hidden, ids=None):
        pass

    def draft(self, hidden, root, tree):
        return torch.cat([root.view(1), self.ids[:tree.size - 1]])


class FixedLookup(PromptLookup):
    def __init__(self, branches):
        super().__init__(LookupConfig(branches=max(len(branches), 1), tokens=4))
        self.fixed = branches

    def branches(self, root):
        return self.fixed


def test_branches_merge_into_the_heads_tree_as_a_trie():
    tree = Tree([[0], [1], [0, 0]])  # nodes 1=[0] (token 1), 2=[1] (token 2), 3=[0,0] (token 3)
    given, tokens = hang(tree, [100, 1, 2, 3], [[1, 3, 7, 8], [1, 4], [9], [1, 3]])
    assert given == [(0, 0, -1), (0, 0, -1, -1), (0, -1), (-1,)] and tokens == [7, 8, 4, 9]
    hybrid = Hybrid(FixedHeads([1, 2, 3]), FixedLookup([[1, 3, 7, 8], [1, 4], [9]]))
    step, ids = hybrid.propose(torch.zeros(4), torch.tensor(100), tree)
    assert step.size == 8 and ids[:4].tolist() == [100, 1, 2, 3]
    for path, token in zip(given, tokens):
        assert ids[step.index[path]] == token
    for node in range(step.size):  # no two siblings hold the same token
        sib = [int(ids[c]) for c in step.children[node]]
        assert len(sib) == len(set(sib))
    again, _ = hybrid.propose(torch.zeros(4), torch.tensor(100), tree)
    assert again is step  # same shape, same Tree: its tensors are not rebuilt


def test_a_node_budget_cuts_lookup_s_branches_first_match_first_never_the_heads_tree():
    """Hybrid.propose(max_nodes=n) (a batched pass's share of rows): the step's tree has at most n nodes, or the
    heads' tree whole where that alone is larger; the branches' nodes kept are a prefix of hang's, parents first."""
    tree = Tree([[0], [1], [0, 0]])
    hybrid = Hybrid(FixedHeads([1, 2, 3]), FixedLookup([[1, 3, 7, 8], [1, 4], [9]]))
    full, full_ids = hybrid.propose(torch.zeros(4), torch.tensor(100), tree)
    for n in range(0, full.size + 2):
        step, ids = hybrid.propose(torch.zeros(4), torch.tensor(100), tree, max_nodes=n)
        assert step.size == min(max(n, tree.size), full.size) and ids[:4].tolist() == [100, 1, 2, 3]
        for node in range(1, step.size):  # each kept node holds the token it holds in the uncut tree
            assert ids[node] == full_ids[full.index[step.paths[node - 1]]]
    step, _ = hybrid.propose(torch.zeros(4), torch.tensor(100), tree, max_nodes=6)
    assert step.paths[3:] == [(0, 0, -1), (0, 0, -1, -1)]  # the first branch's 7, 8 before the second's 4


def test_without_a_match_the_step_tree_is_the_heads_tree():
    tree = Tree([[0], [1], [0, 0]])
    step, ids = Hybrid(FixedHeads([1, 2, 3]), FixedLookup([])).propose(torch.zeros(4), torch.tensor(5), tree)
    assert step is tree and ids.tolist() == [5, 1, 2, 3]
    # a branch that the heads' tree already holds adds nothing either
    step, _ = Hybrid(FixedHeads([1, 2, 3]), FixedLookup([[1, 3]])).propose(torch.zeros(4), torch.tensor(5), tree)
    assert step is tree
    step, ids = Hybrid(None, FixedLookup([[4, 5]])).propose(torch.zeros(4), torch.tensor(5), Tree([]))
    assert step.size == 3 and ids.tolist() == [5, 4, 5]  # lookup alone, no heads


# ---------------------------------------------------------------------------------------- the loop

N_NEW = 64
PROMPT = list(range(30, 45)) * 2


def echo_model(arch="llama"):
    """A tiny model with weak attention: its greedy output falls into repeats (copying-like), so lookup
    branches get accepted, while attention still moves the logits and the KV cache measurably."""
    model = tiny_model(arch)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.02)
    return model


def hf_greedy(model, prompt, n=N_NEW):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def run(decoder, prompt, n=N_NEW, stats=None):
    out = []
    for step in decoder.steps(prompt, n, SamplingConfig(), stats or Stats()):
        out += step
        if len(out) >= n:
            break
    return out[:n]


def decoder_on(path, model, heads=None, tree=None, lookup=None):
    """A Decoder on the lean Llama-family forward ("lean") or transformers' own forward ("generic")."""
    decoder = Decoder(model, heads, tree, lookup)
    if path == "generic":
        decoder.lean = None
    return decoder


@pytest.mark.parametrize("path", ["lean", "generic"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_with_lookup_and_hybrid_equals_plain_greedy(arch, path):
    model = echo_model(arch)
    heads, tree = tiny_heads(model, num_heads=3), load_tree("medusa8", 3)
    reference = hf_greedy(model, PROMPT)
    for h, t in ((None, None), (heads, tree)):  # lookup alone, then heads + lookup
        stats = Stats()
        assert run(decoder_on(path, model, h, t, PromptLookup()), PROMPT, stats=stats) == reference
        assert stats.lookup_accepted >= 5, "lookup branches were hardly accepted: the test would prove little"
        assert stats.nodes > stats.steps * stats.tree_size  # some steps verified lookup nodes too


def test_a_step_without_a_match_verifies_exactly_the_heads_tree():
    model = echo_model()
    heads, tree = tiny_heads(model, num_heads=3), load_tree("medusa8", 3)
    decoder = Decoder(model, heads, tree, PromptLookup())
    rows, forward = [], decoder.lean.hidden  # every forward of the lean path: the prompt's pieces and each verify
    decoder.lean.hidden = lambda cache, ids, *a, **k: (rows.append(ids.numel()), forward(cache, ids, *a, **k))[1]
    prompt, stats = list(range(60, 80)), Stats()  # no token repeats: the first step's n-grams never occurred
    steps = decoder.steps(prompt, N_NEW, SamplingConfig(), stats)
    next(steps), next(steps)
    assert rows == [len(prompt), tree.size] and stats.nodes == tree.size
    for _ in range(40):
        next(steps)
    assert max(rows[1:]) > tree.size and min(rows[1:]) == tree.size  # matched steps grow, the others do not
    assert stats.nodes == sum(rows[1:])


@pytest.mark.parametrize("path", ["lean", "generic"])
def test_cache_after_hybrid_steps_equals_plain_decoding_cache(path):
    model = echo_model("qwen2")
    heads, tree = tiny_heads(model, num_heads=3), load_tree("medusa8", 3)
    cache, out, stats = TreeKVCache.for_model(model, 200), [], Stats()
    decoder = decoder_on(path, model, heads, tree, PromptLookup())
    for step in decoder.steps(PROMPT, 48, SamplingConfig(), stats, cache=cache):
        out += step
        seen = PROMPT + out[:-1]  # everything but the newest token (the next root) is in the cache
        ref = DynamicCache(config=model.config)
        model(torch.tensor([seen]), use_cache=True, **{cache_keyword(model): ref})
        for i, layer in enumerate(ref.layers):
            torch.testing.assert_close(cache.kv[i, 0, :, :, :len(seen)], layer.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(cache.kv[i, 1, :, :, :len(seen)], layer.values, atol=1e-5, rtol=1e-4)
        if len(out) >= 48:
            break
    assert stats.lookup_accepted > 0


# ---------------------------------------------------------------------------------- calibrate, API

def test_lookup_depths_on_a_known_sequence():
    lk = PromptLookup(LookupConfig(max_ngram=3, min_ngram=2, branches=2, tokens=5))
    depth, nodes = lookup_depths(lk, [1, 2, 3, 4, 5, 1, 2], [3, 4, 5, 9])
    # position 6 (root 3): (1 2 3) -> 4 5 1 2 3 against 4 5 9: 2 accepted; position 7 (root 4): 5 1 ..
    # against 5 9: 1; position 8 (root 5): 1 2 .. against 9: 0; position 9 (root 9): no match
    assert depth.tolist() == [2, 1, 0, 0] and nodes.tolist() == [5, 5, 5, 0]
    ranks = torch.tensor([[0, 0], [1, -1], [-1, -1], [0, -1]])  # the tree [[0], [0, 0]] accepts 2, 0, 0, 1
    s = lookup_summary(lk, ranks, depth, nodes, [(0,), (0, 0)])
    assert s["match_rate"] == 0.75 and s["mean_nodes"] == 3.75
    assert s["mean_accepted_heads_only"] == 1 + 3 / 4 and s["mean_accepted_lookup_only"] == 1 + 3 / 4
    assert s["mean_accepted_hybrid"] == 1 + (2 + 1 + 0 + 1) / 4
    assert s["accuracy"][:3] == [2 / 3, 1 / 2, 0.0]
    curve = [{"size": 1, "tree": []}, {"size": 3, "tree": [(0,), (0, 0)]}]
    best = with_lookup(curve, ranks, depth, nodes, lambda n: 1.0)  # flat step time: the bigger tree wins
    assert best["size"] == 3 and curve[0]["expected_accepted_hybrid"] == 1 + 3 / 4


def test_cli_lookup_without_heads_and_the_api(tiny_dirs, capsys):
    bb, heads, _ = tiny_dirs
    assert main(["generate", "abc abc abc abc", "--backbone", str(bb), "--heads", "none", "--lookup",
                 "--max-new-tokens", "24"]) == 0
    out, err = capsys.readouterr()
    plain = draftheads.load(heads=None, backbone=str(bb))
    assert plain.lookup is None  # without heads decoding stays plain unless asked
    assert out.rstrip("\n") == plain.generate("abc abc abc abc", max_new_tokens=24).text and "tokens from lookup" in err
    hybrid = draftheads.load(heads=str(heads), backbone=str(bb), lookup={"tokens": 3})
    assert hybrid.lookup.tokens == 3
    assert hybrid.generate("abc abc", max_new_tokens=16).token_ids == plain.generate("abc abc", max_new_tokens=16).token_ids
    assert main(["generate", "hi", "--backbone", str(bb), "--heads", str(heads), "--no-lookup",
                 "--max-new-tokens", "4"]) == 0
    assert "tokens from lookup" not in capsys.readouterr().err


def test_lookup_is_on_beside_heads_by_default_and_off_for_calibrate_and_bench_s_models(tiny_dirs, capsys):
    import argparse

    from draftheads.calibrate import load_parts
    from draftheads.lookup import LookupConfig

    bb, heads, _ = tiny_dirs
    assert draftheads.load(heads=str(heads), backbone=str(bb)).lookup == LookupConfig()
    assert draftheads.load(heads=str(heads), backbone=str(bb), lookup=False).lookup is None
    assert main(["generate", "hi", "--backbone", str(bb), "--heads", str(heads), "--max-new-tokens", "4"]) == 0
    assert "tokens from lookup" in capsys.readouterr().err
    args = argparse.Namespace(heads=str(heads), backbone=str(bb), device="cpu", dtype=None)
    assert load_parts(args)[0].lookup is None  # calibrate chooses the heads' own trees
    assert load_parts(argparse.Namespace(**vars(args), lookup=True))[0].lookup == LookupConfig()


def test_calibrate_with_lookup_reports_it(tiny_dirs, tmp_path):
    import json

    bb, heads, questions = tiny_dirs
    out = tmp_path / "tree.json"
    assert main(["calibrate", "--backbone", str(bb), "--heads", str(heads), "--prompts", str(questions), "--lookup",
                 "--out", str(out), "--max-new-tokens", "12", "--max-nodes", "6", "--latency-sizes", "1,4",
                 "--latency-steps", "2", "--threads", "1", "--no-measure"]) == 0
    data = json.loads(out.read_text())
    lk = data["lookup"]
    assert lk["positions"] == data["positions"] and lk["mean_accepted_hybrid"] >= lk["mean_accepted_heads_only"]
    assert all("tokens_per_s_hybrid" in c for c in data["curve"])


def test_calibrate_decides_lookup_by_whole_replies_and_load_follows(tiny_dirs, tmp_path, monkeypatch):
    """calibrate --lookup runs the heads' own tree without prompt lookup against the tree fastest with it, on whole
    replies; the faster is written (a tie, within REPLY_TIE, goes to the heads alone: fewer rows), and
    load(lookup=None) takes what was written. Calibrating again without --lookup drops the decision (it was made
    for another tree): the default rule applies again."""
    import json

    from draftheads import calibrate
    from draftheads.heads.checkpoint import read_config
    from draftheads.lookup import LookupConfig

    ran, speed = [], {}

    def replies(dm, prompts, trees, max_new_tokens, bar=None, cuts=None, lookups=None):
        ran.append({n: (t.to_json(), (lookups or {}).get(n, True)) for n, t in trees.items()})
        assert dm.lookup is not None  # --lookup loaded it; the heads alone set it aside per reply
        return {n: {"tokens_per_s": speed.get(n, speed["heads + lookup"]), "mean_accepted": 1.5} for n in trees}

    monkeypatch.setattr(calibrate, "measure_trees", replies)
    bb, heads, questions = tiny_dirs
    out = tmp_path / "tree.json"

    def calibrated(alone: float, both: float, *extra) -> dict:
        speed.update({"heads alone": alone, "heads + lookup": both})
        assert main(["calibrate", "--backbone", str(bb), "--heads", str(heads), "--prompts", str(questions), "--out",
                     str(out), "--max-new-tokens", "12", "--max-nodes", "4", "--latency-sizes", "1,4", "--latency-steps",
                     "2", "--threads", "1", "--draft-confidence", "0", "--no-measure", "--write-to-heads",
                     "--choose-by-replies", "2", *extra]) == 0
        return json.loads(out.read_text())

    data = calibrated(100.0, 120.0, "--lookup")
    lk = data["lookup"]
    assert lk["on"] is True and lk["decided_by"] == "replies" and len(ran) == 1
    assert ran[0] == {"heads alone": (lk["heads_alone"]["tree"], False),
                      **{f"heads + lookup, {len(c['tree']) + 1} nodes": (c["tree"], True) for c in lk["with_lookup_candidates"]}}
    assert lk["with_lookup"]["measured_tokens_per_s"] == 120.0 and data["tree"] == lk["with_lookup"]["tree"]
    # the lookup's candidates tie: the fewest nodes wins
    assert len(lk["with_lookup"]["tree"]) == min(len(c["tree"]) for c in lk["with_lookup_candidates"])
    assert read_config(heads)["lookup"] is True
    assert read_config(heads)["heads_alone"] == {"tree": lk["heads_alone"]["tree"], "draft_confidence": None}
    m = draftheads.load(heads=str(heads), backbone=str(bb))
    assert m.lookup == LookupConfig() and m.tree.to_json() == data["tree"]
    # with lookup off the heads take their own choice, which the replies ran without the lookup
    assert draftheads.load(heads=str(heads), backbone=str(bb), lookup=False).tree.to_json() == lk["heads_alone"]["tree"]

    data = calibrated(100.0, 100.5, "--lookup")  # within 1%: the heads alone
    lk = data["lookup"]
    assert lk["on"] is False and data["tree"] == lk["heads_alone"]["tree"]
    assert read_config(heads)["lookup"] is False and "heads_alone" not in read_config(heads)  # `tree` is theirs
    assert draftheads.load(heads=str(heads), backbone=str(bb)).lookup is None
    assert draftheads.load(heads=str(heads), backbone=str(bb), lookup=True).lookup == LookupConfig()  # asked: on

    # With a batch table: a lone served request decodes as the loop does, with the tree chosen beside the lookup (here
    # the table's rounds and the loop's steps, timed without it, make every tree lose; the lookup's tree is the curve's
    # biggest). The loop's steps are set, not timed: on the real timings of a tiny model a 4-node tree could win alone
    # too (it did after other tests had run), and then both trees are the same
    monkeypatch.setattr(calibrate, "lookup_finalists", lambda curve: [curve[-1]])
    monkeypatch.setattr(calibrate, "batch_round_latency", lambda dm, ids, b, sizes, steps=8, p=None, trees=None: [
        {"size": n, "step_s": 0.01 * n ** 3, "draft_s": 0.0} for n in (sizes or [t.size for t in trees])])
    monkeypatch.setattr(calibrate, "step_latency", lambda dm, ids, sizes, steps=8, p=None, trees=None: [
        {"size": n, "step_s": 0.01 * n ** 3, "draft_s": 0.0, "verify_s": 0.01 * n ** 3, "accept_s": 0.0}
        for n in (sizes or [t.size for t in trees])])
    data = calibrated(100.0, 120.0, "--lookup", "--batch-sizes", "1,2")
    cfg = read_config(heads)
    assert data["lookup"]["on"] is True and cfg["lookup"] is True and cfg["batch_trees"]["1"] == data["tree"]
    assert set(cfg["batch_trees"]) == {"1", "2"} and cfg["batch_trees"]["2"] == [] and len(data["tree"]) == 3
    alone = draftheads.load(heads=str(heads), backbone=str(bb), lookup=False)  # a lone batched sequence as the loop
    assert alone.batch_trees[1].to_json() == data["lookup"]["heads_alone"]["tree"] == alone.tree.to_json() != data["tree"]

    ran.clear()
    data = calibrated(100.0, 100.0)  # without --lookup: nothing decided, no replies run for it
    assert "lookup" not in data and ran == [] and read_config(heads).get("lookup") is None
    assert read_config(heads).get("heads_alone") is None
    assert draftheads.load(heads=str(heads), backbone=str(bb)).lookup == LookupConfig()  # the rule: on beside heads


def test_decide_lookup_by_prediction_and_measure_trees_sets_lookup_aside(tiny_dirs):
    from draftheads.calibrate import decide_lookup, measure_trees
    from draftheads.tree import Tree

    alone = {"tree": [[0]], "draft_confidence": 0.0, "predicted_tokens_per_s": 10.0}
    assert decide_lookup(None, [], alone, [{"tree": [], "tokens_per_s_hybrid": 12.0}], 8)["on"] is True
    d = decide_lookup(None, [], alone, [{"tree": [(0,)], "tokens_per_s_hybrid": 9.0}, {"tree": [], "tokens_per_s_hybrid": 8.0}], 8)
    assert d["on"] is False and d["decided_by"] == "prediction" and d["with_lookup"]["tree"] == [[0]]
    assert [c["tree"] for c in d["with_lookup_candidates"]] == [[[0]], []]

    bb, heads, _ = tiny_dirs
    m = draftheads.load(heads=str(heads), backbone=str(bb), tree="chain2")
    lookup, seen, generate = m.decoder.drafter.lookup, [], m.generate

    def spy(*a, **k):
        seen.append(m.decoder.drafter.lookup is not None)
        return generate(*a, **k)

    m.generate = spy
    ids = m.prompt_ids("abc abc abc")
    measure_trees(m, [ids, ids], {"alone": Tree([[0]]), "both": Tree([[0]])}, 6, lookups={"alone": False})
    assert seen == [False, True, False, True, True, False]  # warm-ups, then the order rotated per prompt
    assert m.decoder.drafter.lookup is lookup


def test_heads_config_refuses_a_lookup_that_is_not_a_bool():
    from draftheads.errors import UserError
    from draftheads.heads.medusa import HeadsConfig

    base = {"num_heads": 2, "hidden_size": 8, "vocab_size": 16}
    assert HeadsConfig.from_dict({**base, "lookup": False}).lookup is False
    assert HeadsConfig.from_dict({**base, "device_trees": {"llama.cpp cpu": {"tree": [], "lookup": True}}})
    with pytest.raises(UserError, match="lookup must be"):
        HeadsConfig.from_dict({**base, "lookup": "yes"})
    with pytest.raises(UserError, match="device_trees"):
        HeadsConfig.from_dict({**base, "device_trees": {"llama.cpp cpu": {"tree": [], "lookup": 1}}})


def test_heads_alone_is_checked_and_taken_where_lookup_is_off(tiny_dirs, capsys):
    """A tree chosen beside prompt lookup (`tree`) and the heads' own (`heads_alone`, with its cut): load takes the one
    that matches the lookup, an explicit tree overrides both, and bench's heads-alone method times the heads' own."""
    import argparse

    from draftheads.bench import Runner
    from draftheads.calibrate import load_parts
    from draftheads.heads.checkpoint import read_config
    from draftheads.heads.medusa import HeadsConfig

    base = {"num_heads": 2, "hidden_size": 8, "vocab_size": 16}
    assert HeadsConfig.from_dict({**base, "heads_alone": {"tree": [[0]], "draft_confidence": 0.3}}).heads_alone
    for bad in ({"tree": [[0]], "draft_confidence": 1.0}, {"draft_confidence": 0.2}, {"tree": [[0]], "cut": 0.2}, [[0]]):
        with pytest.raises(UserError, match="heads_alone must be"):
            HeadsConfig.from_dict({**base, "heads_alone": bad})
    with pytest.raises(UserError, match="device_trees"):
        HeadsConfig.from_dict({**base, "device_trees": {"cpu bfloat16": {"tree": [], "heads_alone": {"tree": 3}}}})
    from draftheads.draftmodel import calibrated_trees, without_lookup

    entry = {"tree": [], "batch_trees": {"1": [], "8": []}, "batch_draft_confidence": {"8": 0.4}, "lookup": True,
             "heads_alone": {"tree": [[0]], "draft_confidence": 0.25}}
    cfg = HeadsConfig.from_dict({**base, "tree": [[0], [1]], "device_trees": {"cpu bfloat16": entry}})
    cal = calibrated_trees(cfg, "cpu", torch.bfloat16)  # another device's entry, every field of it
    assert tuple(cal) == ([], {"1": [], "8": []}, {"8": 0.4}, True, {"tree": [[0]], "draft_confidence": 0.25})
    assert tuple(without_lookup(cal)) == ([[0]], {"1": [[0]], "8": []}, {"8": 0.4, "1": 0.25}, False, None)
    assert calibrated_trees(cfg, "cpu", torch.float32).tree == [[0], [1]]
    assert without_lookup(calibrated_trees(cfg, "cpu", torch.float32)).tree == [[0], [1]]  # nothing stored apart
    assert tuple(calibrated_trees(cfg, "cpu", torch.float32, "llama.cpp")) == (None,) * 5  # torch's do not carry over
    cfg.device_trees["llama.cpp cpu"] = {"tree": [], "lookup": False}
    assert tuple(calibrated_trees(cfg, "cpu", torch.float32, "llama.cpp")) == ([], None, None, False, None)
    # the heads alone uncut: a cut for one sequence chosen beside the lookup does not carry over to them
    cal = cal._replace(cuts={"1": 0.2, "8": 0.4}, heads_alone={"tree": [[0]], "draft_confidence": None})
    assert without_lookup(cal).cuts == {"8": 0.4} and without_lookup(cal._replace(cuts={"1": 0.2})).cuts is None

    bb, heads, _ = tiny_dirs
    cfg = read_config(heads)
    cfg.update(tree=[[0]], lookup=True, batch_trees={"1": [[0]], "4": []}, batch_draft_confidence={"4": 0.2},
               heads_alone={"tree": [[0], [0, 0]], "draft_confidence": 0.3})
    (heads / "config.json").write_text(__import__("json").dumps(cfg))
    m = draftheads.load(heads=str(heads), backbone=str(bb))
    assert m.lookup == LookupConfig() and m.tree.to_json() == [[0]] and m.batch_cuts == {4: 0.2} and m.decoder.min_prob == 0
    off = draftheads.load(heads=str(heads), backbone=str(bb), lookup=False)
    assert off.lookup is None and off.tree.to_json() == [[0], [0, 0]] and off.decoder.min_prob == 0.3
    assert {b: t.to_json() for b, t in off.batch_trees.items()} == {1: [[0], [0, 0]], 4: []} and off.batch_cuts == {1: 0.3, 4: 0.2}
    both = {on: (t.to_json(), c) for on, (t, c) in m.tree_by_lookup.items()}
    assert both == {on: (t.to_json(), c) for on, (t, c) in off.tree_by_lookup.items()}
    assert both == {True: ([[0]], {4: 0.2}), False: ([[0], [0, 0]], {1: 0.3, 4: 0.2})}
    assert {on: (t.to_json(), c) for on in (True, False) for t, c in [off.tree_for(on)]} == both
    named = draftheads.load(heads=str(heads), backbone=str(bb), lookup=False, tree="chain2")
    assert named.tree.to_json() == [[0], [0, 0]] and named.batch_trees == {} and named.tree_by_lookup is None
    assert named.tree_for(True) == named.tree_for(False) == (named.tree, named.batch_cuts)  # a named tree serves both

    dm, plain = load_parts(argparse.Namespace(heads=str(heads), backbone=str(bb), device="cpu", dtype=None))
    run = Runner(dm, plain, LookupConfig())  # bench loads without the lookup; its methods take their own trees
    assert run.ours["speculative"].tree.to_json() == [[0], [0, 0]] and run.ours["speculative"].decoder.min_prob == 0.3
    assert run.ours["hybrid"].tree.to_json() == [[0]] and run.ours["hybrid"].decoder.min_prob == 0
    assert run.ours["hybrid"].lookup == LookupConfig() and run.ours["speculative"].lookup is None
    from draftheads.bench import _trees_said

    by = {"speculative": {"tree": [[0], [0, 0]], "cut": 0.3}, "hybrid": {"tree": [[0]], "cut": 0.0}}
    assert _trees_said({"tree_size": 3, "cut": 0.3, "tree_by_method": by}) == (
        "speculative: tree of 3 nodes, cut to the nodes the heads give a path probability of 0.3 or more; "
        "hybrid: tree of 2 nodes (calibrated apart)")
    assert _trees_said({"tree_size": 2, "cut": 0.0, "tree_by_method": None}) == "tree of 2 nodes"

    cfg.update(tree=[], batch_trees=None)  # the plain tree chosen beside the lookup: said where it decodes
    (heads / "config.json").write_text(__import__("json").dumps(cfg))
    assert main(["generate", "abc abc abc", "--backbone", str(bb), "--heads", str(heads), "--max-new-tokens", "4"]) == 0
    assert "--no-lookup drafts with the heads" in capsys.readouterr().err
    assert main(["generate", "abc abc abc", "--backbone", str(bb), "--heads", str(heads), "--max-new-tokens", "4",
                 "--no-lookup"]) == 0
    assert "tree 3 nodes" in capsys.readouterr().err


def test_batched_api_calls_share_one_round_model_that_decides_lookup(tiny_dirs):
    """model.generate([...]) decides lookup's branches (on beside heads) per batch size from its rounds, as the
    server does; the model keeps them across calls, so a batch size's warm-up is paid once. Outputs stay each
    prompt's alone."""
    bb, heads, _ = tiny_dirs
    m = draftheads.load(heads=str(heads), backbone=str(bb), tree="chain2")
    prompts = ["abc abc abc abc", "xyz xyz xyz"]
    alone = [m.generate(p, max_new_tokens=12).token_ids for p in prompts]
    assert [r.token_ids for r in m.generate(prompts, max_new_tokens=12)] == alone
    first = dict(m.round_costs.rounds)
    assert first.get(2, 0) > 0
    m.generate(prompts, max_new_tokens=12)
    assert m.round_costs.rounds[2] > first[2]


def test_pins_of_lookup_rules_mutation_testing_found_loose():
    """Rules that survived mutants of lookup.py (scripts/mutation.sh lookup, stop 59)."""
    from draftheads.ngrams import NgramStore

    with pytest.raises(UserError, match="lookup settings need 1 <= min_ngram <= max_ngram, branches >= 1, tokens >= 1"):
        LookupConfig(tokens=0)  # branches fine: either one below 1 is refused
    for p in (0.0, 1.0):  # both ends of the store's floor are settings
        assert LookupConfig(store_min_prob=p).store_min_prob == p
    with pytest.raises(UserError, match="lookup settings need store_tokens >= 0 and 0 <= store_min_prob <= 1"):
        LookupConfig(store_tokens=-1)
    with pytest.raises(UserError, match="lookup settings: .*bogus"):
        lookup_config({"bogus": 1})
    with pytest.raises(UserError, match="lookup must be True, False, a dict or a LookupConfig, not 3"):
        lookup_config(3)
    # tensor ids are observed as the token ids they hold
    lk = PromptLookup(LookupConfig(branches=2, tokens=2))
    lk.observe(None, torch.tensor([5, 6, 7, 5]))
    assert lk.branches(6) == [[7, 5]]
    # the store's chain: not taken where it repeats a copy's start, no empty branch where it has none
    store = NgramStore.build([([1, 5, 6, 7, 5], 0)] * 2 + [([3, 4, 9], 0)] * 2, vocab_size=10, min_count=1)
    lk = PromptLookup(LookupConfig(branches=2, tokens=2), store)
    lk.observe(None, [5, 6, 7, 5])
    assert store.chain([7, 5, 6], 2, 0.35) == [7, 5] and lk.branches(6) == [[7, 5]]
    assert lk.branches(8) == []  # no copy, and the store knows nothing after 5 8
    lk.observe(None, [3])
    assert lk.branches(4) == [[9]]  # no copy: the store's chain 3 4 -> 9
    # calibrate's view (teacher_topk) drafts with the store too, up to the sequence's last root
    seq = torch.tensor([0, 3, 4])
    top = PromptLookup(LookupConfig(branches=2, tokens=2), store).teacher_topk(None, seq, 2)
    assert top[:, 1, 0].tolist() == [9, -1] and top[:, 0, 0].tolist() == [-1, -1]
    assert PromptLookup(LookupConfig(branches=2, tokens=2)).teacher_topk(None, seq, 2)[:, 1, 0].tolist() == [-1, -1]


def test_pins_of_calibrate_s_lookup_measures_mutation_testing_found_loose(monkeypatch):
    """Calibrate's lookup functions (scripts/mutation.sh calibrate, stop 59): measure_trees pools every reply of
    each tree with that tree's cut and the reply budget and puts the loaded tree back; decide_lookup's ties go to
    the heads alone, by prediction and by replies, and it runs the heads alone with their cut; with_lookup's step time
    is the tree's size plus the lookup's mean nodes; lookup_depths is each position's best branch's leading run of
    true tokens (token 0 included); lookup_summary's figures and keys."""
    import random
    from types import SimpleNamespace

    from draftheads import calibrate
    from draftheads.calibrate import REPLY_TIE, decide_lookup, measure_trees

    calls = []

    class FakeModel:  # replies whose figures depend on the tree and the prompt
        decoder = SimpleNamespace(tree="loaded", min_prob=0.0, drafter=None)

        def generate(self, ids, max_new_tokens):
            calls.append((self.decoder.tree, self.decoder.min_prob, ids.tolist(), max_new_tokens))
            k, p = {"a": 1, "b": 2, "z": 0}[self.decoder.tree], ids[0].item()
            return SimpleNamespace(stats=SimpleNamespace(new_tokens=10 * k, total_s=0.25 * k,
                                                         accepted=[k + 1] * (3 + p)))

    dm = FakeModel()
    out = measure_trees(dm, [[0], [1]], {"a": "a", "b": "b", "z": "z"}, 40, cuts={"b": 0.3})
    assert calls[:3] == [("a", 0.0, [0], 16), ("b", 0.3, [0], 16), ("z", 0.0, [0], 16)]  # warm-ups
    assert [c[0] for c in calls[3:]] == ["a", "b", "z", "b", "z", "a"] and {c[3] for c in calls[3:]} == {40}
    assert out["a"] == {"new_tokens": 20, "seconds": 0.5, "steps": 7, "accepted": 14, "mean_accepted": 2.0,
                        "tokens_per_s": 40.0}
    assert out["b"]["accepted"] == 21 and out["b"]["mean_accepted"] == 3.0 and out["b"]["tokens_per_s"] == 40.0
    assert out["z"]["tokens_per_s"] == 0.0 and (dm.decoder.tree, dm.decoder.min_prob) == ("loaded", 0.0)

    alone = {"tree": [[0]], "draft_confidence": 0.2, "predicted_tokens_per_s": 10.0}
    assert decide_lookup(None, [], alone, [{"tree": [], "tokens_per_s_hybrid": 10.0}], 8)["on"] is False  # a tie
    seen = {}

    def replies(dm, prompts, trees, max_new_tokens, bar=None, cuts=None, lookups=None):
        seen.update(bar=bar, cuts=cuts, lookups=lookups, n=max_new_tokens)
        return {"heads alone": {"tokens_per_s": 200.0, "mean_accepted": 1.5},
                "heads + lookup, 1 nodes": {"tokens_per_s": speed, "mean_accepted": 2.5}}

    monkeypatch.setattr(calibrate, "measure_trees", replies)
    for speed, on in (((1 + REPLY_TIE) * 200.0, False), (202.5, True)):
        d = decide_lookup("dm", [[1]], alone, [{"tree": [], "tokens_per_s_hybrid": 9.0}], 8, bar="bar")
        assert d["on"] is on and d["decided_by"] == "replies"
    assert seen == {"bar": "bar", "cuts": {"heads alone": 0.2}, "lookups": {"heads alone": False}, "n": 8}
    assert d["heads_alone"]["measured_mean_accepted"] == 1.5 and d["with_lookup"]["measured_mean_accepted"] == 2.5
    assert d["with_lookup"]["predicted_tokens_per_s"] == 9.0

    # several trees with the lookup: the fastest reply wins, not the best prediction; within REPLY_TIE the fewest nodes
    def two(dm, prompts, trees, max_new_tokens, bar=None, cuts=None, lookups=None):
        assert list(trees) == ["heads alone", "heads + lookup, 2 nodes", "heads + lookup, 1 nodes"]
        return {"heads alone": {"tokens_per_s": 200.0, "mean_accepted": 1.5},
                "heads + lookup, 2 nodes": {"tokens_per_s": fast[0], "mean_accepted": 2.5},
                "heads + lookup, 1 nodes": {"tokens_per_s": fast[1], "mean_accepted": 2.0}}

    monkeypatch.setattr(calibrate, "measure_trees", two)
    hybrids = [{"tree": [(0,)], "tokens_per_s_hybrid": 9.0}, {"tree": [], "tokens_per_s_hybrid": 8.9}]
    for fast, tree, on in (((230.0, 220.0), [[0]], True), ((220.0, 230.0), [], True), ((230.0, 229.0), [], True),
                           ((202.0, 195.0), [[0]], False)):
        d = decide_lookup("dm", [[1]], alone, hybrids, 8)
        assert d["with_lookup"]["tree"] == tree and d["on"] is on, fast
        assert [c["measured_tokens_per_s"] for c in d["with_lookup_candidates"]] == list(fast)
    from draftheads.calibrate import FINALIST_MARGIN, lookup_finalists

    curve = [{"tree": t, "tokens_per_s_hybrid": v} for t, v in (([], 100.0), ([(0,)], 101.0), ([(0,), (1,)], 91.5),
                                                                  ([(0,), (0, 0)], 100.5 * (1 - FINALIST_MARGIN) - 1))]
    assert [c["tree"] for c in lookup_finalists(curve)] == [[(0,)], [], [(0,), (1,)]]
    assert [c["tree"] for c in lookup_finalists(curve, whole=2)] == [[(0,)], []]
    assert [c["tree"] for c in lookup_finalists(curve, margin=0.02)] == [[(0,)], []]
    assert [c["tree"] for c in lookup_finalists(curve, margin=0.005)] == [[(0,)]]
    edge = [{"tree": [], "tokens_per_s_hybrid": 100.0}, {"tree": [(0,)], "tokens_per_s_hybrid": 50.0}]
    assert len(lookup_finalists(edge, margin=0.5)) == 2  # exactly at the margin: a finalist
    # a reply exactly at the tie's edge ties: the fewest nodes
    fast = (230.0, (1 - REPLY_TIE) * 230.0)
    assert decide_lookup("dm", [[1]], alone, hybrids, 8)["with_lookup"]["tree"] == []

    ranks = torch.tensor([[0, 0], [1, -1], [-1, -1]])
    curve = [{"size": 1, "tree": []}, {"size": 3, "tree": [(0,), (0, 0)]}]
    with_lookup(curve, ranks, torch.tensor([2, 0, 1]), torch.tensor([4, 0, 2]), lambda n: n)  # a step costs its rows
    assert curve[1]["expected_accepted_hybrid"] == pytest.approx(1 + (2 + 0 + 1) / 3)
    assert curve[1]["tokens_per_s_hybrid"] == pytest.approx(curve[1]["expected_accepted_hybrid"] / (3 + 2))
    one = [{"size": 2, "tree": [(0,)]}]
    with_lookup(one, torch.tensor([[0, -1]]), torch.tensor([0]), torch.tensor([0]), lambda n: n)
    assert one[0]["expected_accepted_hybrid"] == 2.0 and one[0]["tokens_per_s_hybrid"] == 1.0
    with_lookup(one, torch.tensor([[0, -1]])[:0], torch.tensor([], dtype=torch.long), torch.tensor([]), lambda n: n)
    assert one[0]["tokens_per_s_hybrid"] == 0.0  # no positions: no extra nodes, nothing accepted

    rng = random.Random(3)
    lk = PromptLookup(LookupConfig(max_ngram=3, min_ngram=2, branches=2, tokens=3))
    for _ in range(20):  # against the definition, on small vocabularies where copies (and token 0) abound
        prompt, cont = [rng.randrange(3) for _ in range(rng.randrange(3, 9))], [rng.randrange(3) for _ in range(6)]
        depth, _ = lookup_depths(lk, prompt, cont)
        seq, first = prompt + cont, len(prompt) - 1
        top = lk.teacher_topk(None, torch.tensor(seq), 2)
        want = []
        for c in range(first, len(seq) - 1):
            runs = [next((k for k in range(3) if c + 2 + k >= len(seq) or top[k, c, r] != seq[c + 2 + k]), 3)
                    for r in range(2)]
            want.append(max(runs))
        assert depth.tolist() == want

    one_token = PromptLookup(LookupConfig(max_ngram=2, min_ngram=2, branches=1, tokens=1))
    s = lookup_summary(one_token, torch.tensor([[0]]), torch.tensor([1]), torch.tensor([1]), [(0,)])
    assert {k: s[k] for k in ("positions", "match_rate", "accuracy", "mean_nodes")} == {
        "positions": 1, "match_rate": 1.0, "accuracy": [1.0], "mean_nodes": 1.0}
    assert (s["mean_accepted_lookup_only"], s["mean_accepted_heads_only"], s["mean_accepted_hybrid"]) == (2.0, 2.0, 2.0)
    assert s["config"] == {**vars(LookupConfig(max_ngram=2, min_ngram=2, branches=1, tokens=1))}


def test_pins_of_the_calibration_writer_mutation_testing_found_loose(tmp_path):
    """bench._write_tree_to_heads (scripts/mutation.sh calibration_io, stop 60): another device's entry keeps the
    entries already there; heads_alone keeps its cut; a table without cuts drops an earlier one; a table without
    batch size 1 takes the cut for one sequence beside its own; no cuts at all is null."""
    import json

    from draftheads.bench import _write_tree_to_heads
    from draftheads.heads.checkpoint import read_config, save_heads

    save_heads(tiny_heads(tiny_model(), 2), tmp_path)
    _write_tree_to_heads(tmp_path, [], None, "llama.cpp cpu", None, False)
    _write_tree_to_heads(tmp_path, [], None, "cpu bfloat16", None, True, {"tree": [[0]], "draft_confidence": 0.3})
    cfg = read_config(tmp_path)
    assert cfg["device_trees"]["llama.cpp cpu"] == {"tree": [], "lookup": False, "batch_draft_confidence": None}
    assert cfg["device_trees"]["cpu bfloat16"]["heads_alone"] == {"tree": [[0]], "draft_confidence": 0.3}
    _write_tree_to_heads(tmp_path, [[0]], {"2": {"tree": [[0]], "draft_confidence": 0.2}})
    _write_tree_to_heads(tmp_path, [[0]], {"2": {"tree": []}})  # a table without cuts: the earlier ones go
    assert "batch_draft_confidence" not in read_config(tmp_path)
    _write_tree_to_heads(tmp_path, [[0]], {"2": {"tree": [], "draft_confidence": 0.2}}, cut=0.4)
    assert read_config(tmp_path)["batch_draft_confidence"] == {"1": 0.4, "2": 0.2}
    _write_tree_to_heads(tmp_path, [[0]], {"1": {"tree": [[0]]}, "2": {"tree": [], "draft_confidence": 0.2}}, cut=0.4)
    assert read_config(tmp_path)["batch_draft_confidence"] == {"2": 0.2}  # the table's entry for 1 holds it (none)
    _write_tree_to_heads(tmp_path, [[0]], {"1": {"tree": [[0]]}})
    _write_tree_to_heads(tmp_path, [[0]])  # one sequence's tree alone, uncut, nothing else cut
    assert json.loads((tmp_path / "config.json").read_text())["batch_draft_confidence"] is None


def test_lookup_s_count_is_cut_to_the_tokens_the_reply_kept():
    """The reply ends inside a step (max_new_tokens here): its tokens past the end are no reply's, so neither the
    tokens per step nor the lookup's count may include them (`generate` on stderr: 'N tokens from lookup'). The
    oracle: which of a longer reply's tokens the lookup gave, counted over the first n, where the shorter reply's
    steps are the longer one's (a step's tokens: its accepted drafts, then the backbone's)."""
    from draftheads.draftmodel import Backbone, DraftModel
    from tiny import tiny_tokenizer

    dm = DraftModel(Backbone(model=echo_model(), tokenizer=tiny_tokenizer(), name="tiny"), lookup=True)
    ids = torch.tensor(PROMPT)
    full = dm.generate(ids, max_new_tokens=N_NEW).stats
    assert full.lookup_accepted >= 5  # the lookup drafted much of it
    flags = [False] + [f for g, a in zip(full.lookup_given, full.accepted) for f in (g + (False,))[:a]]
    assert len(flags) == N_NEW
    checked = 0
    for n in range(1, N_NEW):
        s = dm.generate(ids, max_new_tokens=n).stats
        assert 1 + sum(s.accepted) == s.new_tokens == n
        assert s.lookup_accepted <= n - 1
        if s.lookup_given[:-1] == full.lookup_given[:s.steps - 1] and s.lookup_given[-1:] == full.lookup_given[s.steps - 1:s.steps]:
            assert s.lookup_accepted == sum(flags[:n]), n
            checked += s.accepted[-1] < len(s.lookup_given[-1]) + 1  # cut inside a step with drafts
    assert checked >= 2
