"""Trees or plain decoding at the current batch size: decided from the rounds the server has served.

`calibrate --batch-sizes` picks a tree per batch size from rounds it times on its own prompts. Served
rounds differ: other prompts, requests joining and leaving, prefill chunks in between, another load on
the machine. On this project's CPU its table chose 2-node chains at 8 sequences and the served
heads-batched runs came out at 0.81x plain-batched (docs/results.md, "batching"). So the batched step asks this
model, per round, whether the sequences that follow the table take its tree or decode plainly: it keeps,
per batch size, how the two kinds compare, takes the better, and spends one round in `explore_every`
on the other to follow a changing load (one in 4 x `explore_every` when the other loses by
`wide_margin` or more).

The comparison is paired: each round that follows a round of the other kind at the same batch size
(an explored round, and the round after it) compares the two rates over their two spans, and the
decision weighs the recent pairs. Rates kept per kind apart compared different moments: the kind
served most of the time had its last rounds seconds ago, the explored one over minutes, on a machine
whose speed moves by 10-30% between minutes. Batch sizes are measured apart: pooled (5-8 sequences
with 8), they compared the batch sizes each kind happened to run at (a pass of 5 costs less than one
of 8; a level's drain is all small batches). A served run at 8 clients so rated its plain rounds 34 ms
when the plain server's took 28, kept the trees, and came out at 0.96x plain.

Switching changes which tokens are drafted, never which are emitted under greedy or exact acceptance
(both are exact per step); typical acceptance already depends on the tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Rate:
    """Every round of one kind at one batch size, for reports."""
    tokens: float = 0.0
    seconds: float = 0.0
    rounds: int = 0

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Pairs:
    """Adjacent rounds of the two kinds at one batch size: decayed sums, over the pairs, of the tokens each
    kind's round rate gives over the pair's seconds (recent pairs count most)."""
    trees: float = 0.0
    plain: float = 0.0
    count: int = 0


@dataclass
class RoundCosts:
    """Per batch size, the tokens/s of rounds with the table's trees against plain rounds, paired in time."""

    warmup: int = 4  # rounds of each kind, and pairs, before the faster kind is preferred
    explore_every: int = 16  # then one round in this many takes the other kind
    decay: float = 0.95  # per pair: the decision follows the last ~20 pairs (~10 explored rounds)
    # A kind that loses by this factor or more is tried 4x less often: it needs a large change of load to
    # win, and each try costs (plain rounds at one sequence: ~1.4 tokens a round lost to 1)
    wide_margin: float = 1.2
    rates: dict[tuple[int, bool], _Rate] = field(default_factory=dict)  # (batch size, trees) -> every round
    pairs: dict[int, _Pairs] = field(default_factory=dict)  # batch size -> paired rounds
    rounds: dict[int, int] = field(default_factory=dict)  # batch size -> rounds served
    last: tuple | None = None  # the round recorded last, whatever its batch size: (batch size, trees, tokens, seconds)

    def __post_init__(self):
        assert self.warmup >= 1 and self.explore_every >= 2 and 0 < self.decay <= 1 and self.wide_margin > 1

    def use_trees(self, batch: int, margin: float = 1.0) -> bool:
        """Whether the next round of `batch` sequences should take the table's trees: once warmed up, where the
        recent pairs give them at least `margin` times plain's rate (a tie, at 1.0, goes to the trees)."""
        assert batch >= 1 and margin > 0
        trees, plain, pairs = self._rate(batch, True), self._rate(batch, False), self.pairs.get(batch, _Pairs())
        if min(trees.rounds, plain.rounds, pairs.count) < self.warmup:  # warm-up: alternate, each round a pair
            if self.last is not None and self.last[0] == batch:
                return not self.last[1]
            return trees.rounds <= plain.rounds
        best = pairs.trees >= margin * pairs.plain
        hi, lo = max(pairs.trees, pairs.plain), min(pairs.trees, pairs.plain)
        every = self.explore_every * (4 if hi >= self.wide_margin * lo else 1)
        explore = self.rounds.get(batch, 0) % every == every - 1
        return best != explore

    def record(self, batch: int, trees: bool, tokens: int, seconds: float) -> None:
        """A served round of `batch` sequences emitted `tokens` in `seconds` (draft + verify + accept)."""
        assert tokens >= 0 and seconds >= 0 and batch >= 1
        r = self.rates.setdefault((batch, trees), _Rate())
        r.tokens += tokens
        r.seconds += seconds
        r.rounds += 1
        self.rounds[batch] = self.rounds.get(batch, 0) + 1
        last = self.last  # the round just before this one: a pair if it ran the other kind at this batch size
        if last and last[0] == batch and last[1] != trees and seconds > 0 < last[3]:
            this, other = (tokens, seconds), last[2:]
            (tt, ts), (pt, ps) = (this, other) if trees else (other, this)
            span, p = seconds + last[3], self.pairs.setdefault(batch, _Pairs())
            p.trees = p.trees * self.decay + tt / ts * span
            p.plain = p.plain * self.decay + pt / ps * span
            p.count += 1
        self.last = (batch, trees, tokens, seconds)

    def _rate(self, batch: int, trees: bool) -> _Rate:
        return self.rates.get((batch, trees), _Rate())

    def summary(self) -> dict[int, dict[str, float]]:
        """{batch size: {"trees_over_plain": the recent pairs' ratio (the decision; 0 before any pair),
        "pairs", "trees", "plain" (tokens/s over every round of each kind), "trees_rounds", "rounds"}}."""
        out = {}
        for b, n in sorted(dict(self.rounds).items()):  # a copy: /health reads it while the worker writes
            trees, plain, pairs = self._rate(b, True), self._rate(b, False), self.pairs.get(b, _Pairs())
            out[b] = {"trees_over_plain": pairs.trees / pairs.plain if pairs.plain > 0 else 0.0,
                      "pairs": pairs.count, "trees": trees.per_second, "plain": plain.per_second,
                      "trees_rounds": trees.rounds, "rounds": n}
        return out
