"""Tree search against brute force on synthetic accuracies; calibrate on a tiny model."""

import json
import random
from collections import Counter

import pytest
import torch

from draftheads import defaults
from draftheads.calibrate import MISS, PAST_END, REPLY_TIE, accuracies, empirical_accepted
from draftheads.draftmodel import load
from draftheads.cli import main
from draftheads.tree import load_tree
from draftheads.treesearch import choose, dp_trees, expected_accepted, greedy_trees, interpolate
from bench_fixtures import tiny_dirs  # noqa: F401  (fixture)


def brute_force(p, max_nodes, depth, max_children=None) -> dict[int, float]:
    """Best expected accepted drafts (root excluded) for each number of drafted nodes, over every
    prefix-closed tree: grow all trees one node at a time, deduplicated as sets."""
    ranks = len(p[0])
    level = {frozenset()}
    best = {0: 0.0}
    for n in range(1, max_nodes):
        grown = set()
        for t in level:
            for q in [()] + list(t):
                if len(q) == depth:
                    continue
                if max_children and sum(1 for c in t if c[:-1] == q) >= max_children:
                    continue
                grown.update(t | {q + (r,)} for r in range(ranks) if q + (r,) not in t)
        level = grown
        best[n] = max(expected_accepted(p, t) - 1 for t in level)
    return best


def random_table(rng, heads=3, ranks=3, sort=False):
    p = [[rng.random() * 0.7 for _ in range(ranks)] for _ in range(heads)]
    return [sorted(row, reverse=True) for row in p] if sort else p


@pytest.mark.parametrize("seed", range(4))
def test_dp_is_optimal_and_greedy_is_optimal_on_sorted_tables(seed):
    rng = random.Random(seed)
    p = random_table(rng, sort=True)
    best = brute_force(p, 7, 3)
    for trees in (dp_trees(p, 7), greedy_trees(p, 7)):
        assert [round(expected_accepted(p, t), 9) for t in trees] == [round(1 + best[n], 9) for n in range(7)]
        assert all(len(t) == n for n, t in enumerate(trees))
        for t in trees:
            load_tree([list(q) for q in t])  # prefix-closed, valid ranks


def test_dp_beats_greedy_where_rank_accuracy_is_not_sorted():
    # Medusa's frontier offers rank r+1 only after rank r: with rank 2 far better than rank 1 it
    # must spend a node on rank 1 first. The DP takes rank 2 directly.
    p = [[0.5, 0.01, 0.4], [0.5, 0.01, 0.4]]
    best = brute_force(p, 4, 2)
    dp = [expected_accepted(p, t) for t in dp_trees(p, 4)]
    greedy = [expected_accepted(p, t) for t in greedy_trees(p, 4)]
    assert dp == pytest.approx([1 + best[n] for n in range(4)])
    assert dp[2] == pytest.approx(1.9) and greedy[2] < dp[2]


@pytest.mark.parametrize("seed", range(3))
def test_dp_with_a_branching_limit(seed):
    p = random_table(random.Random(10 + seed))
    best = brute_force(p, 7, 3, max_children=2)
    trees = dp_trees(p, 7, max_children=2)
    assert [expected_accepted(p, t) for t in trees] == pytest.approx([1 + best[n] for n in range(7)])
    assert all(c <= 2 for t in trees for c in Counter(q[:-1] for q in t).values())


def test_choose_maximises_tokens_per_second():
    p = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.2, 0.1]]
    step = lambda n: 1.0 + 0.08 * n  # noqa: E731
    best = brute_force(p, 8, 3)
    want = max(range(8), key=lambda n: (1 + best[n]) / step(n + 1))
    got = choose(p, step, max_nodes=8)["best"]
    assert got["size"] == want + 1
    assert got["tokens_per_s"] == pytest.approx((1 + best[want]) / step(want + 1))
    assert choose(p, lambda n: float(n), max_nodes=8)["best"]["size"] == 1  # cost linear in nodes: no tree pays


def test_interpolate_is_monotone_and_extrapolates():
    xs, ys = [1, 4, 8, 16], [1.0, 2.0, 1.5, 3.0]  # the dip at 8 is noise
    assert interpolate(xs, ys, 1) == 1.0
    assert interpolate(xs, ys, 2) == pytest.approx(1 + 1 / 3)
    assert interpolate(xs, ys, 8) == 2.0
    assert interpolate(xs, ys, 32) == pytest.approx(3.0 + 2 * 1.0)


def test_accuracies_are_conditional_on_shallower_heads():
    ranks = torch.tensor([[0, 0], [0, 1], [1, MISS], [MISS, 0], [0, PAST_END]])
    p, counts = accuracies(ranks)
    assert counts == [5, 3]  # head 1 only where head 0 was right and a target exists
    assert p[0][:2] == pytest.approx([3 / 5, 1 / 5])
    assert p[1][:2] == pytest.approx([1 / 3, 1 / 3])
    assert empirical_accepted(ranks, [[0], [0, 0]]) == pytest.approx((3 + 2 + 1 + 1 + 2) / 5)


def test_calibrate_on_a_tiny_model_writes_a_valid_tree(tiny_dirs, tmp_path):
    bb, heads, questions = tiny_dirs
    out = tmp_path / "tree.json"
    rc = main(["calibrate", "--backbone", str(bb), "--heads", str(heads), "--prompts", str(questions),
               "--out", str(out), "--max-new-tokens", "12", "--max-nodes", "8", "--latency-sizes", "1,4,8",
               "--latency-steps", "2", "--threads", "1", "--write-to-heads", "--batch-sizes", "1,3"])
    assert rc == 0
    data = json.loads(out.read_text())
    table = data["batch_trees"]  # a tree per batch size, from whole batched rounds
    assert set(table) == {"1", "3"} and all(1 <= row["size"] <= 8 for row in table.values())
    assert [x["size"] for x in table["3"]["latency"]] == [1, 4, 8] and table["3"]["latency"][0]["step_s"] > 0
    # a cut chosen from the grid where the batched step cuts (2+ sequences; the root alone: none), whole trees alone
    row = table["3"]
    assert row["draft_confidence"] in (0.0, *defaults.BATCH_DRAFT_CONFIDENCES)
    assert (row["draft_confidence"] == 0.0) == (row["size"] == 1)
    assert 1 <= row["predicted_rows"] <= row["size"]
    assert sorted((c["depth"], c["draft_confidence"]) for c in row["candidates"]) == [(0, 0.0)] + [
        (d, c) for d in (1, 2, 3) for c in defaults.BATCH_DRAFT_CONFIDENCES]
    # one sequence: whole trees, or a chain cut to its confident nodes where that was predicted faster; the loop
    # and the table's entry for 1 take the same
    solo = data.get("draft_confidence")
    cands = data["cut_chains"]["candidates"] if solo else []
    by_replies = data.get("chosen_by_replies")  # finalists within 10% of the fastest prediction, run whole
    if by_replies:
        finals = by_replies["candidates"]
        assert len(finals) >= 2 and by_replies["prompts"] == 3  # the tiny question file's three
        # the fastest replies, or within REPLY_TIE of them the fewest rows
        won = next(c for c in finals if c["tree"] == data["tree"] and c["draft_confidence"] == (solo or 0.0))
        assert won["measured_tokens_per_s"] >= (1 - REPLY_TIE) * max(c["measured_tokens_per_s"] for c in finals)
        # whole trees within 10% of the best whole one (listed first), cut chains within 10% of the fastest
        whole = [c for c in finals if c["draft_confidence"] == 0]
        top = max(c["predicted_tokens_per_s"] for c in finals)
        assert all(c["predicted_tokens_per_s"] >= 0.9 * whole[0]["predicted_tokens_per_s"] for c in whole)
        assert all(c["predicted_tokens_per_s"] >= 0.9 * top for c in finals if c["draft_confidence"] > 0)
        assert all(c["measured_mean_accepted"] >= 1 for c in finals)
        assert table["1"]["tree"] == data["tree"]  # a lone server request takes the loop's tree
    if solo:
        assert solo in defaults.BATCH_DRAFT_CONFIDENCES and data["search"] == "cut chain"
        assert by_replies or data["predicted_tokens_per_s"] > data["whole_tree_predicted_tokens_per_s"]
        assert table["1"]["draft_confidence"] == solo and table["1"]["tree"] == data["tree"]
        assert max(c["tokens_per_s"] for c in cands) >= data["predicted_tokens_per_s"]
    else:
        assert "draft_confidence" not in table["1"]
    written = json.loads((heads / "config.json").read_text())
    assert written["batch_draft_confidence"] == {"3": row["draft_confidence"], **({"1": solo} if solo else {})}
    dm = load(heads=str(heads), backbone=str(bb))
    assert dm.batch_cuts == {3: row["draft_confidence"], **({1: solo} if solo else {})}
    assert dm.decoder.min_prob == (solo or 0.0)
    assert [x["size"] for x in table["3"]["chain_latency"]] == [1, 2, 3, 4] and table["3"]["tree"] in ([], [[0]], [[0], [0, 0]], [[0], [0, 0], [0, 0, 0]])
    assert json.loads((heads / "config.json").read_text())["batch_trees"] == {b: r["tree"] for b, r in table.items()}
    tree = load_tree(str(out), 3)
    assert tree.size == data["size"] <= 8
    assert data["predicted_mean_accepted"] >= 1 and data["measured_mean_accepted"] >= 1
    assert len(data["accuracy"]) == 3 and len(data["accuracy"][0]) == 10
    assert json.loads((heads / "config.json").read_text())["tree"] == data["tree"]


def test_batch_table_shrinks_the_tree_as_rounds_get_dearer():
    from draftheads.calibrate import batch_table

    p = [[0.6, 0.2] + [0.0] * 8, [0.5, 0.2] + [0.0] * 8]
    flat = [{"size": n, "step_s": 0.05} for n in (1, 4, 8)]  # one sequence: nodes are free up to 8
    steep = [{"size": n, "step_s": 0.05 * n} for n in (1, 4, 8)]  # many: every node costs a token's time
    table = batch_table(p, {1: flat, 8: steep}, max_nodes=8, max_depth=2)
    assert table["1"]["size"] > 1 and table["8"]["size"] == 1 and table["8"]["tree"] == []
    assert table["8"]["predicted_tokens_per_s"] == pytest.approx(8 / 0.05) == table["8"]["plain_tokens_per_s"]


def _confident_half(n: int = 8):
    """ranks [n, 3] and probs [n, 3, 10]: the first half of the positions right at rank 0 of every head, each
    head giving it 0.9; the second half wrong everywhere, each head giving its rank 0 only 0.1."""
    ranks = torch.cat([torch.zeros(n // 2, 3, dtype=torch.long), torch.full((n // 2, 3), MISS)])
    probs = torch.full((n, 3, 10), 0.01)
    probs[: n // 2, :, 0], probs[n // 2:, :, 0] = 0.9, 0.1
    return ranks, probs


def test_a_cut_keeps_the_confident_nodes_and_accepts_only_kept_ones():
    from draftheads.calibrate import cut_rows_tokens

    ranks, probs = _confident_half()
    paths = [(0,), (1,), (0, 0), (0, 0, 0)]
    assert cut_rows_tokens(ranks, probs, paths, 0.0) == (5.0, pytest.approx(empirical_accepted(ranks, paths)))
    assert cut_rows_tokens(ranks, probs, paths, 0.5) == (pytest.approx((4 + 1) / 2), pytest.approx((4 + 1) / 2))
    # 0.9 x 0.9 = 0.81 >= 0.8 keeps [0, 0] and cuts [0, 0, 0] (0.729): the accepted chain stops at depth 2
    assert cut_rows_tokens(ranks, probs, paths, 0.8) == (pytest.approx((3 + 1) / 2), pytest.approx((3 + 1) / 2))
    assert cut_rows_tokens(ranks, probs, paths, 0.95) == (1.0, 1.0)
    probs[: 4, :, 0] = 0.5  # exact in float32: [0] scores 0.5, [0, 0] 0.25; a path at the threshold is kept
    assert cut_rows_tokens(ranks, probs, paths, 0.5) == (pytest.approx((2 + 1) / 2), pytest.approx((2 + 1) / 2))


def test_batch_table_chooses_for_the_cut_where_the_batched_step_cuts():
    from draftheads.calibrate import batch_table

    ranks, probs = _confident_half()
    p, _ = accuracies(ranks)
    lat = [{"size": n, "step_s": 0.05 * (1 + 0.8 * (n - 1))} for n in (1, 2, 4)]  # each row 80% of a plain round
    whole = batch_table(p, {8: lat}, max_nodes=4, max_depth=3)["8"]
    # whole trees: every node costs more than it gives; chosen for whole trees, served whole
    assert whole["tree"] == [] and whole["draft_confidence"] == 0.0
    branching = [{"size": n, "step_s": 0.05 * (1 + 0.8 * (n - 1) + 4 * (n == 4))} for n in (1, 2, 4)]
    cut = batch_table(p, {1: lat, 8: branching}, max_nodes=4, max_depth=3, cut=(ranks, probs, [0.2], {8: lat}))
    # cut, the 3-deep chain verifies 2.5 rows a sequence for 2.5 tokens: 2.5 / 0.11 s against plain's 1 / 0.05 s
    assert cut["8"]["tree"] == [[0], [0, 0], [0, 0, 0]] and cut["8"]["draft_confidence"] == 0.2
    assert cut["8"]["predicted_rows"] == pytest.approx(2.5) and cut["8"]["predicted_mean_accepted"] == pytest.approx(2.5)
    assert cut["8"]["predicted_tokens_per_s"] == pytest.approx(8 * 2.5 / 0.11)  # costed as chains, not branching trees
    assert cut["8"]["chain_latency"] == lat and cut["8"]["latency"] == branching
    assert [c["depth"] for c in cut["8"]["candidates"]] == [0, 1, 2, 3]  # plain (depth 0) is a candidate too
    assert max(c["tokens_per_s"] for c in cut["8"]["candidates"]) == cut["8"]["predicted_tokens_per_s"]
    assert cut["1"] == batch_table(p, {1: lat}, max_nodes=4, max_depth=3)["1"]  # alone, trees are verified whole
    # A cut chain still drafts with every head it reaches: at 20 ms a head, the 3-deep chain cut to 2.5 rows
    # costs 0.11 - 0.03 + 0.06 s, and no chain beats plain any more.
    drafty = [{**x, "draft_s": 0.02 * (x["size"] - 1)} for x in lat]
    assert batch_table(p, {8: lat}, max_nodes=4, max_depth=3, cut=(ranks, probs, [0.2], {8: drafty}))["8"]["tree"] == []


def test_batch_table_chooses_the_cut_with_the_tree():
    from draftheads.calibrate import batch_table

    ranks, probs = _confident_half()
    p, _ = accuracies(ranks)
    lat = [{"size": n, "step_s": 0.05 * (1 + 0.8 * (n - 1))} for n in (1, 2, 4)]
    row = batch_table(p, {8: lat}, max_nodes=4, max_depth=3, cut=(ranks, probs, [0.05, 0.2, 0.95], {8: lat}))["8"]
    # 3-deep chain: at 0.05 the unsure half keeps [0] (0.1) too, 3 rows for 2.5 tokens (2.5 / 0.13 s); at 0.2
    # only the sure half's nodes, 2.5 rows for 2.5 tokens (2.5 / 0.11 s); at 0.95 none (1 / 0.05 s)
    assert row["tree"] == [[0], [0, 0], [0, 0, 0]] and row["draft_confidence"] == 0.2
    assert row["predicted_tokens_per_s"] == pytest.approx(8 * 2.5 / 0.11)
    by = {(c["depth"], c["draft_confidence"]): c for c in row["candidates"]}
    assert sorted(by) == [(0, 0.0)] + [(d, c) for d in (1, 2, 3) for c in (0.05, 0.2, 0.95)]  # plain is never cut
    assert by[3, 0.05]["rows"] == pytest.approx(3.0) and by[3, 0.05]["tokens_per_s"] == pytest.approx(8 * 2.5 / 0.13)
    assert by[3, 0.95]["rows"] == 1.0 and by[3, 0.95]["tokens_per_s"] == pytest.approx(8 / 0.05)
    # A row worth less than its cost at every cut: plain (0.05 s a row on top of a 0.05 s round)
    dear = [{"size": n, "step_s": 0.05 * n} for n in (1, 2, 4)]
    assert batch_table(p, {8: dear}, max_nodes=4, max_depth=3, cut=(ranks, probs, [0.2], {8: dear}))["8"]["tree"] == []


def test_line_fit_is_least_squares():
    from draftheads.calibrate import line_fit

    assert line_fit([1, 2, 4], [1.0, 2.0, 4.0])(3) == pytest.approx(3.0)
    # a noisy middle point moves the line by a third of its error, not the whole of it as interpolation would
    assert line_fit([1, 2, 3], [1.0, 2.6, 3.0])(2) == pytest.approx(2.2)
    assert line_fit([2, 2], [1.0, 3.0])(5) == 2.0  # one size: its mean


def test_a_deeper_chain_takes_over_only_when_it_is_clearly_faster():
    from draftheads.calibrate import DEEPER_CHAIN_MARGIN, pick_chain

    assert DEEPER_CHAIN_MARGIN == 0.05
    # calibrate's figures at 4 sequences on this CPU (tokens/s for chains of depth 0-4): the 2-deep chain is
    # 7.8% over [[0]], the 3- and 4-deep only 1.9% and 3.7% over the 2-deep
    tps = [153.4, 182.6, 196.9, 200.7, 204.1]
    assert pick_chain([{"depth": d, "tokens_per_s": t} for d, t in enumerate(tps)])["depth"] == 2
    # each step under the margin, but two add up past it against the pick: the 2-deep takes over
    assert pick_chain([{"depth": d, "tokens_per_s": t} for d, t in enumerate([100, 104, 108, 112])])["depth"] == 2
    assert pick_chain([{"depth": 0, "tokens_per_s": 100}, {"depth": 1, "tokens_per_s": 105}])["depth"] == 0  # a tie at 5%
    # from a depth already trusted (one sequence's best whole tree): the fastest down to it, the margin past it
    four = [{"depth": d, "tokens_per_s": t} for d, t in enumerate([100, 104, 108, 112])]
    assert pick_chain(four, start=2)["depth"] == 2 and pick_chain(four, start=3)["depth"] == 3
    assert pick_chain([{"depth": d, "tokens_per_s": t} for d, t in enumerate([100, 110, 104, 108])], start=2)["depth"] == 1


def test_finalists_are_the_whole_tree_and_each_depth_s_best_cut_above_zero():
    from draftheads.calibrate import FINALIST_MARGIN, fastest_per_depth, finalists

    def cand(depth, cut, tps):
        return {"depth": depth, "draft_confidence": cut, "tokens_per_s": tps, "tokens": 1.0 + depth / 10,
                "round_s": 0.004, "rows": 1.0 + depth / 2}

    # the root alone (cut 0 only); depth 1 whole is its fastest, but a whole chain is no cut: its best cut (0.2) goes;
    # depth 2's best cut falls outside the margin; depth 3's first of two equal cuts is kept
    candidates = [cand(0, 0.0, 200.0), cand(1, 0.0, 260.0), cand(1, 0.1, 240.0), cand(1, 0.2, 250.0),
                  cand(2, 0.0, 255.0), cand(2, 0.2, 200.0), cand(3, 0.1, 245.0), cand(3, 0.2, 245.0)]
    assert [(c["depth"], c["draft_confidence"]) for c in fastest_per_depth(candidates)] == [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.1)]

    def whole(tree, tps):
        return {"size": len(tree) + 1, "tree": tree, "tokens_per_s": tps, "expected_accepted": 1.5, "step_s": 0.005}

    # the best whole tree, then two runners-up (the 4th fastest stays out; the root alone is no runner-up),
    # those within the margin
    curve = [whole([], 240.0), whole([[0]], 250.0), whole([[0], [1]], 255.0), whole([[0], [1], [0, 0]], 235.0),
             whole([[0], [1], [0, 0], [2]], 200.0), whole([[0], [1], [0, 0], [2], [0, 1]], 210.0)]
    out = finalists(curve, {"candidates": candidates})
    assert [(f["tree"], f["draft_confidence"]) for f in out] == [
        ([[0], [1]], 0.0), ([[0]], 0.0), ([[0], [1], [0, 0]], 0.0), ([[0]], 0.2), ([[0], [0, 0], [0, 0, 0]], 0.1)]
    assert all(f["predicted_tokens_per_s"] >= (1 - FINALIST_MARGIN) * 255.0 for f in out)
    assert [f["tree"] for f in finalists(curve, {"candidates": candidates}, whole=1)][:2] == [[[0], [1]], [[0]]]
    # the root alone is kept where it is the fastest
    assert finalists([whole([], 300.0), whole([[0]], 250.0)], {"candidates": []})[0]["tree"] == []
    # whole trees are weighed against the best whole tree, not against a cut predicted far above them (stop 56:
    # cuts predicted 367 tok/s, whole trees 340 and 326; the whole trees' replies were the fastest)
    far = candidates + [cand(2, 0.3, 300.0)]
    out = finalists(curve, {"candidates": far})
    assert [(f["tree"], f["draft_confidence"]) for f in out] == [
        ([[0], [1]], 0.0), ([[0]], 0.0), ([[0], [1], [0, 0]], 0.0), ([[0], [0, 0]], 0.3)]


def test_searches_respect_ranks_and_depth_bounds():
    p = [[0.5, 0.3], [0.6]]  # head 1 measured at one rank only
    assert expected_accepted(p, [(0, 1)]) == 1.0  # a rank the table lacks is never right
    # Greedy: its frontier stops at each head's last measured rank (per head) and at the table's depth.
    assert greedy_trees(p, 10)[-1] == [(0,), (0, 0), (1,), (1, 0)]
    assert greedy_trees([[0.5], [0.9, 0.8]], 10)[-1] == [(0,), (0, 0), (0, 1)]
    assert greedy_trees([[0.5, 0.3], [0.9, 0.8]], 10, max_rank=[1, 2])[-1] == [(0,), (0, 0), (0, 1)]
    assert greedy_trees(p, 10, max_depth=1)[-1] == [(0,), (1,)]
    # DP: trees only as large as fit (2 ranks at depth 1: 0..2 drafted nodes), children shallower first.
    assert [len(t) for t in dp_trees(p, 10, max_depth=1)] == [0, 1, 2]
    assert dp_trees([[0.5, 0.45], [0.9, 0.1]], 4)[3] == [(0,), (1,), (0, 0)]


def test_choose_keeps_the_better_search_per_size_and_names_it():
    step = lambda n: 1.0  # noqa: E731
    tie = choose([[0.6, 0.2], [0.5, 0.1]], step, max_nodes=4)["curve"]
    assert {c["by"] for c in tie} == {"greedy"}  # sorted table: both optimal, greedy's tree kept
    assert all(c["expected_accepted"] == c["expected_accepted_greedy"] == pytest.approx(c["expected_accepted_dp"])
               for c in tie)
    p = [[0.5, 0.01, 0.4], [0.5, 0.01, 0.4]]  # rank 2 beats rank 1: the DP's tree is better by 0.39
    curve = choose(p, step, max_nodes=4)["curve"]
    assert curve[2]["by"] == "dp" and curve[2]["tree"] == dp_trees(p, 4)[2]
    assert curve[2]["expected_accepted"] == pytest.approx(1.9) and curve[2]["expected_accepted_greedy"] < 1.9
    deep = choose([[0.9, 0.5], [0.9, 0.5], [0.9]], step, max_nodes=6, max_depth=2)["curve"]
    assert max(len(q) for c in deep for q in c["tree"]) == 2


def test_interpolate_extrapolates_from_one_or_two_points():
    assert interpolate([4], [0.1], 10) == 0.1
    assert interpolate([1, 3], [1.0, 2.0], 5) == pytest.approx(3.0)
    assert interpolate([1, 2, 4], [1.0, 2.0, 3.0], 6) == pytest.approx(4.0)  # the last segment's slope


def test_batch_table_fits_chain_costs_within_the_few_row_regime():
    """At 16 sequences a 3-node chain is 48 rows, past the few-row kernels' 32: its round costs a step more,
    which a line through every timed chain spreads over all of them. With max_rows those rounds leave the
    fit (and the candidates), and a plain round is costed as measured."""
    from draftheads.calibrate import batch_table

    ranks, probs = _confident_half()
    p, _ = accuracies(ranks)
    chains = [{"size": n, "step_s": s} for n, s in ((1, 0.05), (2, 0.08), (3, 0.25), (4, 0.30))]
    cut = (ranks, probs, [0.05, 0.2, 0.95], {16: chains})
    plain = {16: [{"size": 1, "step_s": 0.05}, {"size": 2, "step_s": 0.08}]}
    skewed = batch_table(p, plain, max_nodes=4, max_depth=3, cut=cut)["16"]["candidates"]
    fitted = batch_table(p, plain, max_nodes=4, max_depth=3, cut=cut, max_rows=32)["16"]["candidates"]
    assert skewed[0]["depth"] == 0 and skewed[0]["round_s"] < 0.04  # the 48- and 64-row rounds drag the line
    assert fitted[0]["depth"] == 0 and fitted[0]["round_s"] == pytest.approx(0.05)
    assert all(16 * c["rows"] <= 32 for c in fitted) and any(16 * c["rows"] > 32 for c in skewed)


def test_calibrate_cuts_one_sequence_s_chain_where_that_beats_every_whole_tree(tiny_dirs, tmp_path, monkeypatch):
    """calibrate's choice for one sequence: where every whole tree loses to plain steps but a chain cut to its
    confident nodes wins, the loop's tree is that chain with its cut, the table's entry for one sequence takes the
    same, both are written to the heads, and load() hands the cut to the loop. Accuracies and step costs are
    forced (_confident_half; each row 40% of a plain step; the chains, timed apart, on a machine then twice as
    slow, which calibrate puts back on the whole trees' scale)."""
    from draftheads import calibrate

    def measures(dm, prompt_ids, continuation, probs=False):
        ranks, p = _confident_half(2 * (len(continuation) // 2))
        return ranks, p if probs else None

    def costs(dm, prompt_ids, sizes, steps=8, p=None, trees=None):
        slow = 1 if sizes else 2
        return [{"size": n, "draft_s": 0.0, "verify_s": slow * 0.01 * (1 + 0.4 * (n - 1)), "accept_s": 0.0,
                 "step_s": slow * 0.01 * (1 + 0.4 * (n - 1))} for n in (sizes or [t.size for t in trees])]

    monkeypatch.setattr(calibrate, "head_measures", measures)
    monkeypatch.setattr(calibrate, "step_latency", costs)
    bb, heads, questions = tiny_dirs
    out = tmp_path / "tree.json"
    assert main(["calibrate", "--backbone", str(bb), "--heads", str(heads), "--prompts", str(questions), "--out", str(out),
                 "--max-new-tokens", "12", "--max-nodes", "4", "--latency-sizes", "1,2,4", "--threads", "1",
                 "--draft-confidence", "0.2,0.95", "--measure-limit", "2", "--write-to-heads", "--batch-sizes", "1",
                 "--choose-by-replies", "0"]) == 0
    data = json.loads(out.read_text())
    # whole: 1 + 0.5 + 0.5 + 0.5 tokens for 4 rows (2.5 / 0.022 s) or fewer; cut at 0.2: the sure half's 3 nodes
    # only, 2.5 rows for 2.5 tokens (2.5 / 0.016 s); plain 1 / 0.01 s
    assert data["tree"] == [[0], [0, 0], [0, 0, 0]] and data["draft_confidence"] == 0.2
    assert data["predicted_rows"] == pytest.approx(2.5) and data["predicted_tokens_per_s"] == pytest.approx(2.5 / 0.016)
    assert data["whole_tree_predicted_tokens_per_s"] < data["predicted_tokens_per_s"]
    assert data["cut_chains"]["chain_scale"] == pytest.approx(0.5)  # chains on the whole trees' scale
    assert "chosen_by_replies" not in data
    assert data["batch_trees"]["1"]["tree"] == data["tree"] and data["batch_trees"]["1"]["draft_confidence"] == 0.2
    assert data["measured"]["calibrated"]["steps"] > 0  # generate ran with the cut
    written = json.loads((heads / "config.json").read_text())
    assert written["tree"] == data["tree"] and written["batch_draft_confidence"] == {"1": 0.2}
    dm = load(heads=str(heads), backbone=str(bb))
    assert dm.decoder.min_prob == 0.2 and dm.batch_cuts == {1: 0.2}
    # calibrated again without a cut to choose: the cut for one sequence goes
    monkeypatch.undo()
    assert main(["calibrate", "--backbone", str(bb), "--heads", str(heads), "--prompts", str(questions), "--out", str(out),
                 "--max-new-tokens", "8", "--max-nodes", "4", "--latency-sizes", "1,4", "--latency-steps", "2",
                 "--threads", "1", "--draft-confidence", "0", "--no-measure", "--write-to-heads"]) == 0
    assert "1" not in (json.loads((heads / "config.json").read_text())["batch_draft_confidence"] or {})
    assert load(heads=str(heads), backbone=str(bb)).decoder.min_prob == 0.0


def test_calibrate_lets_whole_replies_choose_among_one_sequence_s_finalists(tiny_dirs, tmp_path, monkeypatch):
    """Accuracies and costs as in the test above (the 3-deep chain cut at 0.2 predicted fastest, 156 tok/s; the
    2-deep one at 0.2 within 10%, 143; the 1-deep chain, 125, not; the best whole tree, 114, always, as whole trees
    are weighed against each other): replies that run the 2-deep chain fastest choose it, and it is what the heads
    get; replies within 1% of each other choose the chain with fewer rows; replies clearly faster for the deeper
    chain choose it."""
    from draftheads import calibrate
    from draftheads.bench import _write_tree_to_heads

    def measures(dm, prompt_ids, continuation, probs=False):
        ranks, p = _confident_half(2 * (len(continuation) // 2))
        return ranks, p if probs else None

    def costs(dm, prompt_ids, sizes, steps=8, p=None, trees=None):
        return [{"size": n, "draft_s": 0.0, "verify_s": 0.01 * (1 + 0.4 * (n - 1)), "accept_s": 0.0,
                 "step_s": 0.01 * (1 + 0.4 * (n - 1))} for n in (sizes or [t.size for t in trees])]

    ran, speed = [], {}

    def replies(dm, prompts, trees, max_new_tokens, bar=None, cuts=None):
        ran.append((len(prompts), {n: (t.to_json(), (cuts or {}).get(n)) for n, t in trees.items()}))
        return {n: {"tokens_per_s": speed.get(n, 100.0), "mean_accepted": 1.5} for n, t in trees.items()}  # whole: 100

    monkeypatch.setattr(calibrate, "head_measures", measures)
    monkeypatch.setattr(calibrate, "step_latency", costs)
    monkeypatch.setattr(calibrate, "measure_trees", replies)
    bb, heads, questions = tiny_dirs
    _write_tree_to_heads(heads, [[0]], {"1": {"tree": [[0]]}, "4": {"tree": [], "draft_confidence": 0.3}})  # a table before
    out = tmp_path / "tree.json"

    def calibrated(chain3: float, chain2: float) -> dict:
        speed.update({"4 nodes cut at 0.2": chain3, "3 nodes cut at 0.2": chain2})
        assert main(["calibrate", "--backbone", str(bb), "--heads", str(heads), "--prompts", str(questions), "--out",
                     str(out), "--max-new-tokens", "12", "--max-nodes", "4", "--latency-sizes", "1,2,4", "--threads", "1",
                     "--draft-confidence", "0.2,0.95", "--no-measure", "--write-to-heads", "--choose-by-replies", "1"]) == 0
        return json.loads(out.read_text())

    data = calibrated(150.0, 200.0)
    # the whole trees within 10% of the best whole one (the chains of 1-3, equal predictions here) and the cuts
    assert ran == [(1, {"4 nodes whole": ([[0], [0, 0], [0, 0, 0]], 0.0), "3 nodes whole": ([[0], [0, 0]], 0.0),
                        "2 nodes whole": ([[0]], 0.0), "4 nodes cut at 0.2": ([[0], [0, 0], [0, 0, 0]], 0.2),
                        "3 nodes cut at 0.2": ([[0], [0, 0]], 0.2)})]
    assert data["tree"] == [[0], [0, 0]] and data["draft_confidence"] == 0.2
    assert data["predicted_tokens_per_s"] == pytest.approx(2 / 0.014)  # the chosen chain's own prediction
    assert [(c["tree"], c["draft_confidence"], c["measured_tokens_per_s"]) for c in data["chosen_by_replies"]["candidates"]] == [
        ([[0], [0, 0], [0, 0, 0]], 0.0, 100.0), ([[0], [0, 0]], 0.0, 100.0), ([[0]], 0.0, 100.0),
        ([[0], [0, 0]], 0.2, 200.0), ([[0], [0, 0], [0, 0, 0]], 0.2, 150.0)]
    # one sequence's tree and cut replace the table's entry for 1 (a lone server request); batches keep theirs
    written = json.loads((heads / "config.json").read_text())
    assert written["tree"] == [[0], [0, 0]] and written["batch_draft_confidence"] == {"1": 0.2, "4": 0.3}
    assert written["batch_trees"] == {"1": [[0], [0, 0]], "4": []}
    dm = load(heads=str(heads), backbone=str(bb))
    assert dm.decoder.min_prob == 0.2 and dm.batch_cuts == {1: 0.2, 4: 0.3}
    assert calibrated(200.0, 198.5)["tree"] == [[0], [0, 0]]  # a tie (within 1%): the fewer rows
    assert calibrated(200.0, 197.0)["tree"] == [[0], [0, 0], [0, 0, 0]]  # 1.5% faster: the deeper chain
    speed["3 nodes whole"] = 250.0  # a runner-up whole tree's replies win: it is the tree, whole, with its prediction
    data = calibrated(200.0, 197.0)
    assert data["tree"] == [[0], [0, 0]] and "draft_confidence" not in data
    assert data["predicted_tokens_per_s"] == next(c["tokens_per_s"] for c in data["curve"] if c["size"] == 3)
    # with a table per batch size, its entry for 1 (a lone server request) takes the loop's tree, whole
    assert main(["calibrate", "--backbone", str(bb), "--heads", str(heads), "--prompts", str(questions), "--out",
                 str(out), "--max-new-tokens", "12", "--max-nodes", "4", "--latency-sizes", "1,2,4", "--threads", "1",
                 "--draft-confidence", "0.2,0.95", "--no-measure", "--choose-by-replies", "1", "--batch-sizes", "1"]) == 0
    data = json.loads(out.read_text())
    assert data["tree"] == data["batch_trees"]["1"]["tree"] == [[0], [0, 0]]
    assert "draft_confidence" not in data["batch_trees"]["1"] and "predicted_rows" not in data["batch_trees"]["1"]
