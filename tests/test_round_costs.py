"""The served-round cost model that decides, per batch size, between the table's trees and plain rounds."""

import pytest

from draftheads.round_costs import RoundCosts, pooled


def serve(costs, batch, rate, rounds):
    """Run `rounds` rounds of `batch` sequences at tokens/s rate[trees]; returns the choices made."""
    choices = []
    for _ in range(rounds):
        trees = costs.use_trees(batch)
        costs.record(batch, trees, tokens=int(rate[trees] * 2), seconds=2.0)
        choices.append(trees)
    return choices


def test_it_alternates_until_both_kinds_have_their_warm_up_rounds():
    costs = RoundCosts(warmup=3, explore_every=100)
    assert serve(costs, 4, {True: 10, False: 50}, 6) == [True, False, True, False, True, False]


@pytest.mark.parametrize("faster", [True, False])
def test_then_it_takes_the_faster_kind_and_explores_the_other_once_in_explore_every(faster):
    costs = RoundCosts(warmup=2, explore_every=5)
    rate = {faster: 40, not faster: 36}  # within wide_margin: explored every explore_every rounds
    choices = serve(costs, 8, rate, 4 + 20)[4:]  # after the warm-up, rounds 5..24 of this batch size
    # round n (1-based) explores when n % 5 == 0
    assert choices == [(faster if (n % 5) else not faster) for n in range(5, 25)]


def test_batch_sizes_are_measured_apart():
    costs = RoundCosts(warmup=1, explore_every=1000)
    serve(costs, 1, {True: 30, False: 20}, 4)
    serve(costs, 8, {True: 20, False: 60}, 4)
    assert costs.use_trees(1) and not costs.use_trees(8)
    assert costs.use_trees(2)  # never served: warm-up starts with the trees
    assert not costs.use_trees(5) and [pooled(b) for b in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    s = costs.summary()
    assert s[1] == pytest.approx({"trees": 30.0, "plain": 20.0, "trees_overall": 30.0, "plain_overall": 20.0,
                                  "trees_rounds": 3, "rounds": 4})
    assert s[8]["plain"] == pytest.approx(60.0 / 8) and s[8]["plain_overall"] == pytest.approx(60.0)  # a sequence; all


def test_recent_rounds_count_most_so_it_follows_a_changing_load():
    costs = RoundCosts(warmup=1, explore_every=4, decay=0.5)
    early = serve(costs, 4, {True: 50, False: 30}, 10)
    assert early[2:].count(True) >= 6  # the trees, but for the exploring rounds
    serve(costs, 4, {True: 10, False: 30}, 12)  # the trees stopped paying (another load on the machine)
    late = serve(costs, 4, {True: 10, False: 30}, 8)
    assert late.count(False) >= 6  # plain, but for the exploring rounds


def test_the_rate_is_decayed_tokens_a_sequence_over_decayed_seconds():
    costs = RoundCosts(decay=0.5)
    costs.record(2, True, tokens=10, seconds=1.0)
    costs.record(2, True, tokens=30, seconds=1.0)
    assert costs.summary()[2]["trees"] == pytest.approx((10 / 2 * 0.5 + 30 / 2) / (1 * 0.5 + 1))
    # reports also get the undecayed tokens/s of all the sequences over every round of each kind
    costs.record(2, False, tokens=6, seconds=3.0)
    s = costs.summary()[2]
    assert (s["trees_overall"], s["plain_overall"], s["trees_rounds"], s["rounds"]) == (pytest.approx(20.0), 2.0, 2, 3)


def test_a_pool_compares_kinds_not_the_batch_sizes_they_happened_to_run_at():
    """Rounds of 5 and of 8 sequences cost alike (one pool). Plain was explored while 5 sequences ran: 5
    tokens in 30 ms; the trees served 8: 10 tokens in 40 ms. Per round the trees' 250 tokens/s beat plain's
    167, but a sequence gets 33.3 tokens/s plain and 31.2 with trees: at 8 sequences plain gives 267."""
    costs = RoundCosts(warmup=1, explore_every=100)
    costs.record(5, False, tokens=5, seconds=0.030)
    costs.record(8, True, tokens=10, seconds=0.040)
    assert not costs.use_trees(8)
    s = costs.summary()[8]
    assert s["plain"] == pytest.approx(1 / 0.030) and s["trees"] == pytest.approx(1.25 / 0.040)
    assert s["trees_overall"] == pytest.approx(250.0)  # reports: what all the sequences got
    with pytest.raises(AssertionError):
        costs.record(0, True, 1, 1.0)
    with pytest.raises(AssertionError):
        RoundCosts(explore_every=1)


def test_settings_and_records_are_checked_at_their_bounds():
    RoundCosts(warmup=1, explore_every=2, decay=1.0)  # decay 1: no forgetting, allowed
    for bad in ({"decay": 0.0}, {"decay": 1.5}, {"warmup": 0}, {"explore_every": 1}):
        with pytest.raises(AssertionError):
            RoundCosts(**bad)
    costs = RoundCosts()
    costs.record(1, True, 0, 0.0)  # a round may emit nothing measurable in no measurable time
    for tokens, seconds in ((-1, 1.0), (1, -1.0)):
        with pytest.raises(AssertionError):
            costs.record(1, True, tokens, seconds)


def test_equal_rates_keep_the_trees():
    costs = RoundCosts(warmup=1, explore_every=100)
    costs.record(4, True, 10, 1.0)
    costs.record(4, False, 10, 1.0)
    assert costs.use_trees(4)  # a tie goes to the heads' trees (what the table was calibrated to take)


@pytest.mark.parametrize("faster", [True, False])
def test_a_kind_that_loses_widely_is_explored_four_times_less_often(faster):
    costs = RoundCosts(warmup=2, explore_every=5, wide_margin=1.2)
    rate = {faster: 40, not faster: 20}
    choices = serve(costs, 1, rate, 4 + 40)[4:]  # rounds 5..44
    assert choices == [(faster if (n % 20) else not faster) for n in range(5, 45)]
    with pytest.raises(AssertionError):
        RoundCosts(wide_margin=1.0)
