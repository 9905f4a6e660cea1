"""Which tree, or plain decoding, at the current batch size: decided from the rounds the server has served.

`calibrate --batch-sizes` picks a tree per batch size from rounds it times on its own prompts. Served
rounds differ: other prompts, requests joining and leaving, prefill chunks in between, another load on
the machine. On this project's CPU its table chose 2-node chains at 8 sequences and the served
heads-batched runs came out at 0.81x plain-batched (README, batching). So the batched step asks this
model, per round, whether the sequences that follow the table take its tree or decode plainly, and,
when the table's tree is a chain, whether they take a shorter one: the calibration prompts' acceptance
is not the served traffic's (docs/serving.md: the 4-deep chain cut at 0.2 gave 1.68 tokens a
sequence-round on them, 1.26 on vicuna questions). It keeps, per batch size, the tokens per second of
the rounds served each way, takes the best, and spends one round in `explore_every` on the least tried
other kind to follow a changing load (one in 4 x `explore_every` when that one loses by `wide_margin`
or more). Batch sizes are pooled up to the next
power of two (3 with 4, 5-8 with 8): the few-row kernels pad rows to a power of two, so those rounds
cost alike, and a short burst of traffic does not have to warm up every size on its own.

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
    tokens: float = 0.0  # decayed sums: recent rounds count most
    seconds: float = 0.0
    rounds: int = 0

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RoundCosts:
    """Per batch size, the measured tokens/s of each kind of round: plain (kind 0) and the table's tree
    (the last kind), with, for a chain table, its shorter chains in between (kind k: its first k nodes)."""

    warmup: int = 4  # rounds of each kind before the fastest one is preferred
    explore_every: int = 16  # then one round in this many takes another kind
    decay: float = 0.95  # per round of the same kind: the estimate follows the last ~20 of them
    # A kind that loses by this factor or more is tried 4x less often: it needs a large change of load to
    # win, and each try costs (plain rounds at one sequence: ~1.4 tokens a round lost to 1)
    wide_margin: float = 1.2
    rates: dict[tuple[int, int], _Rate] = field(default_factory=dict)  # (pooled batch size, kind) -> rate
    rounds: dict[int, int] = field(default_factory=dict)  # pooled batch size -> rounds served

    def __post_init__(self):
        assert self.warmup >= 1 and self.explore_every >= 2 and 0 < self.decay <= 1 and self.wide_margin > 1

    def choose(self, batch: int, kinds: int) -> int:
        """The kind (0 .. kinds-1) the next round of `batch` sequences should take."""
        assert kinds >= 2
        batch = pooled(batch)
        rates = [self._rate(batch, k) for k in range(kinds)]
        deepest_first = range(kinds - 1, -1, -1)
        fewest = min(deepest_first, key=lambda k: rates[k].rounds)  # ties: the deepest (what the table chose)
        if rates[fewest].rounds < self.warmup:
            return fewest  # take turns until every kind has its warm-up rounds
        best = max(deepest_first, key=lambda k: rates[k].per_second)
        other = min((k for k in deepest_first if k != best), key=lambda k: rates[k].rounds)  # the least tried
        wide = rates[best].per_second >= self.wide_margin * rates[other].per_second
        every = self.explore_every * (4 if wide else 1)
        return other if self.rounds.get(batch, 0) % every == every - 1 else best

    def record(self, batch: int, kind: int, tokens: int, seconds: float) -> None:
        """A served round of `batch` sequences of `kind` emitted `tokens` in `seconds` (draft + verify + accept)."""
        assert tokens >= 0 and seconds >= 0 and kind >= 0
        batch = pooled(batch)
        r = self.rates.setdefault((batch, kind), _Rate())
        r.tokens = r.tokens * self.decay + tokens
        r.seconds = r.seconds * self.decay + seconds
        r.rounds += 1
        self.rounds[batch] = self.rounds.get(batch, 0) + 1

    def _rate(self, batch: int, kind: int) -> _Rate:
        return self.rates.get((batch, kind), _Rate())

    def summary(self) -> dict[int, dict]:
        """{pooled batch size: {"plain": tokens/s, "trees": the fastest tree kind's tokens/s, "kinds": {kind:
        tokens/s}, "rounds": n}} of what was measured."""
        rates = dict(self.rates)  # a copy: /health reads it while the worker writes
        out = {}
        for b, n in sorted(dict(self.rounds).items()):
            kinds = {k: r.per_second for (bb, k), r in sorted(rates.items()) if bb == b}
            out[b] = {"plain": kinds.get(0, 0.0), "trees": max((v for k, v in kinds.items() if k > 0), default=0.0),
                      "kinds": kinds, "rounds": n}
        return out
