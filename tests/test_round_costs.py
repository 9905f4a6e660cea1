"""The served-round cost model that decides, per batch size, between the table's trees and plain rounds."""

import pytest

from draftheads.round_costs import RoundCosts


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
    assert costs.use_trees(2) and costs.use_trees(7)  # never served: warm-up starts with the trees
    s = costs.summary()
    assert s[1] == pytest.approx({"trees_over_plain": 1.5, "pairs": 2, "trees": 30.0, "plain": 20.0,
                                  "trees_rounds": 3, "rounds": 4}) and s[8]["plain"] == pytest.approx(60.0)


def test_recent_pairs_count_most_so_it_follows_a_changing_load():
    costs = RoundCosts(warmup=1, explore_every=4, decay=0.5)
    early = serve(costs, 4, {True: 50, False: 30}, 10)
    assert early[2:].count(True) >= 6  # the trees, but for the exploring rounds
    serve(costs, 4, {True: 10, False: 30}, 12)  # the trees stopped paying (another load on the machine)
    late = serve(costs, 4, {True: 10, False: 30}, 8)
    assert late.count(False) >= 6  # plain, but for the exploring rounds


def test_a_pair_is_two_adjacent_rounds_of_both_kinds_at_one_batch_size():
    costs = RoundCosts(decay=0.5)
    costs.record(2, True, tokens=10, seconds=1.0)
    costs.record(2, False, tokens=6, seconds=2.0)  # a pair over 3 s: trees 10/s, plain 3/s
    assert (costs.pairs[2].trees, costs.pairs[2].plain) == (30.0, 9.0)
    costs.record(2, False, tokens=4, seconds=1.0)  # same kind: no pair
    costs.record(2, True, tokens=20, seconds=1.0)  # a pair over 2 s with the round before: 20/s, 4/s
    assert (costs.pairs[2].trees, costs.pairs[2].plain, costs.pairs[2].count) == (30 * 0.5 + 40, 9 * 0.5 + 8, 2)
    costs.record(3, False, tokens=3, seconds=1.0)
    costs.record(2, False, tokens=9, seconds=1.0)  # the round before was another batch size's: no pair
    assert costs.pairs[2].count == 2 and 3 not in costs.pairs
    s = costs.summary()[2]  # reports: every round of each kind
    assert (s["trees"], s["plain"], s["trees_rounds"], s["rounds"]) == (15.0, pytest.approx(19 / 4), 2, 5)
    assert s["trees_over_plain"] == pytest.approx(55 / 12.5)
    with pytest.raises(AssertionError):
        RoundCosts(explore_every=1)


def test_a_kind_is_compared_with_the_other_at_the_same_moment():
    """The trees served fast minutes ago; then the machine slows to half speed, where plain is 10% faster.
    Rates kept per kind would compare the trees' fast past with plain's slow present and keep the trees."""
    costs = RoundCosts(warmup=1, explore_every=1000)
    for _ in range(10):
        costs.record(4, True, tokens=10, seconds=1.0)
    costs.record(4, True, tokens=5, seconds=1.0)  # half speed from here on
    costs.record(4, False, tokens=5.5, seconds=1.0)
    assert not costs.use_trees(4)


def test_each_batch_size_is_measured_apart():
    """A pass of 5 sequences costs less than one of 8: trees served in a drain at 5 (260 tokens/s) do not
    count at 8, where plain (267 tokens/s) beats the trees (250) in their pair."""
    costs = RoundCosts(warmup=1, explore_every=100)
    costs.record(8, True, tokens=10, seconds=0.040)
    costs.record(8, False, tokens=8, seconds=0.030)
    for _ in range(5):
        costs.record(5, True, tokens=6.5, seconds=0.025)
    assert not costs.use_trees(8)
    assert not costs.use_trees(5)  # 5 has no plain round of its own yet: its warm-up takes one
    assert set(costs.summary()) == {5, 8} and costs.summary()[8]["plain"] == pytest.approx(8 / 0.030)
    with pytest.raises(AssertionError):
        costs.record(0, True, 1, 1.0)


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


def test_a_margin_asks_the_trees_to_win_by_it():
    """use_trees(b, margin): the trees only where the recent pairs give them at least margin x plain's rate (the batch
    asks lookup's branches on a plain table entry to win by defaults.LOOKUP_MARGIN)."""
    costs = RoundCosts(warmup=1, explore_every=100)
    costs.record(4, True, 103, 1.0)
    costs.record(4, False, 100, 1.0)
    assert costs.use_trees(4) and costs.use_trees(4, 1.03) and not costs.use_trees(4, 1.05)
    with pytest.raises(AssertionError):
        costs.use_trees(4, 0.0)


@pytest.mark.parametrize("faster", [True, False])
def test_a_kind_that_loses_widely_is_explored_four_times_less_often(faster):
    costs = RoundCosts(warmup=2, explore_every=5, wide_margin=1.2)
    rate = {faster: 40, not faster: 20}
    choices = serve(costs, 1, rate, 4 + 40)[4:]  # rounds 5..44
    assert choices == [(faster if (n % 20) else not faster) for n in range(5, 45)]
    with pytest.raises(AssertionError):
        RoundCosts(wide_margin=1.0)
