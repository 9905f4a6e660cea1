"""Trees or plain decoding at the current batch size: decided from the rounds the server has served.

`calibrate --batch-sizes` picks a tree per batch size from rounds it times on its own prompts. Served
rounds differ: other prompts, requests joining and leaving, prefill chunks in between, another load on
the machine. On this project's CPU its table chose 2-node chains at 8 sequences and the served
heads-batched runs came out at 0.81x plain-batched (README, batching). So the batched step asks this
model, per round, whether the sequences that follow the table take its tree or decode plainly: it keeps,
per batch size, the tokens per second of the rounds served each way, takes the better, and spends one
round in `explore_every` on the other to follow a changing load (one in 4 x `explore_every` when
the other loses by `wide_margin` or more). Batch sizes are pooled up to the next
power of two (3 with 4, 5-8 with 8): the few-row kernels pad rows to a power of two, so those rounds
cost alike, and a short burst of traffic does not have to warm up every size on its own. Since they cost
alike, a pool compares tokens per second a sequence: the kind explored while 5 sequences ran and the kind
served while 8 ran would otherwise compare batches, not kinds (a served run at 8 clients rated trees
275 tokens/s and plain 158, the plain rounds having been seen mostly as the batch filled, when its plain
passes gave 8% more tokens a second than its tree passes).

Switching changes which tokens are drafted, never which are emitted under greedy or exact acceptance
(both are exact per step); typical acceptance already depends on the tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def pooled(batch: int) -> int:
    """The batch size whose measurements a round of `batch` sequences shares: the next power of two."""
    assert batch >= 1
    return 1 << (batch - 1).bit_length()


@dataclass
class _Rate:
    tokens: float = 0.0  # decayed sums of tokens a sequence (a round's tokens / its sequences): recent rounds count most
    seconds: float = 0.0
    rounds: int = 0
    # Undecayed sums over every round (all the sequences' tokens), for reports only: the decayed rates of a
    # kind explored one round in 16 or 64 span minutes where the other's span seconds, so they compare
    # different moments of the load
    all_tokens: float = 0.0
    all_seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def overall(self) -> float:
        return self.all_tokens / self.all_seconds if self.all_seconds > 0 else 0.0


@dataclass
class RoundCosts:
    """Per batch size, the measured tokens/s a sequence of rounds with the table's trees and of plain rounds."""

    warmup: int = 4  # rounds of each kind before the faster one is preferred
    explore_every: int = 16  # then one round in this many takes the other kind
    decay: float = 0.95  # per round of the same kind: the estimate follows the last ~20 of them
    # A kind that loses by this factor or more is tried 4x less often: it needs a large change of load to
    # win, and each try costs (plain rounds at one sequence: ~1.4 tokens a round lost to 1)
    wide_margin: float = 1.2
    rates: dict[tuple[int, bool], _Rate] = field(default_factory=dict)  # (pooled batch size, trees) -> rate
    rounds: dict[int, int] = field(default_factory=dict)  # pooled batch size -> rounds served

    def __post_init__(self):
        assert self.warmup >= 1 and self.explore_every >= 2 and 0 < self.decay <= 1 and self.wide_margin > 1

    def use_trees(self, batch: int) -> bool:
        """Whether the next round of `batch` sequences should take the table's trees."""
        batch = pooled(batch)
        trees, plain = self._rate(batch, True), self._rate(batch, False)
        if min(trees.rounds, plain.rounds) < self.warmup:
            return trees.rounds <= plain.rounds  # alternate until both kinds have their warm-up rounds
        best = trees.per_second >= plain.per_second
        hi, lo = max(trees.per_second, plain.per_second), min(trees.per_second, plain.per_second)
        every = self.explore_every * (4 if hi >= self.wide_margin * lo else 1)
        explore = self.rounds.get(batch, 0) % every == every - 1
        return best != explore

    def record(self, batch: int, trees: bool, tokens: int, seconds: float) -> None:
        """A served round of `batch` sequences emitted `tokens` in all in `seconds` (draft + verify + accept)."""
        assert tokens >= 0 and seconds >= 0 and batch >= 1
        per_sequence, batch = tokens / batch, pooled(batch)
        r = self.rates.setdefault((batch, trees), _Rate())
        r.tokens = r.tokens * self.decay + per_sequence
        r.seconds = r.seconds * self.decay + seconds
        r.rounds += 1
        r.all_tokens += tokens
        r.all_seconds += seconds
        self.rounds[batch] = self.rounds.get(batch, 0) + 1

    def _rate(self, batch: int, trees: bool) -> _Rate:
        return self.rates.get((batch, trees), _Rate())

    def summary(self) -> dict[int, dict[str, float]]:
        """{pooled batch size: {"trees", "plain": tokens/s a sequence (the decayed rates the decision uses),
        "trees_overall", "plain_overall" (tokens/s of all the sequences over every round of each kind),
        "trees_rounds", "rounds"}} of what was measured."""
        out = {}
        for b, n in sorted(dict(self.rounds).items()):  # a copy: /health reads it while the worker writes
            trees, plain = self._rate(b, True), self._rate(b, False)
            out[b] = {"trees": trees.per_second, "plain": plain.per_second, "trees_overall": trees.overall,
                      "plain_overall": plain.overall, "trees_rounds": trees.rounds, "rounds": n}
        return out
