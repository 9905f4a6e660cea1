"""What the served-round model (round_costs.py) reads against what the rounds ran: `--batch` sequences decoded together
with the default heads and prompt lookup (the server's batched worker, in one process, a finished sequence starting its
prompt again), for `--rounds` rounds, every round's kind, tokens and seconds logged. Prints the model's decision ratio
(its recent pairs), the tokens/s of every round of each kind, and how the rounds that form pairs (a round next to one of
the other kind) compare with the others of their kind: where the pairs' rounds differ from the rest, the decision
leans.

    .venv/bin/python scripts/round_pairs.py --prompts P --batch 8 [--rounds 1000]

Use prompts that are neither training nor evaluation data (scripts/unused_prompts.py).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import draftheads
from draftheads.batch import BatchDecoder
from draftheads.round_costs import RoundCosts
from draftheads.train.prompts import load_prompts


class Logged(RoundCosts):
    """A RoundCosts that keeps every recorded round: (batch size, trees, tokens, seconds)."""

    def __post_init__(self):
        super().__post_init__()
        self.log: list[tuple[int, bool, int, float]] = []

    def record(self, batch: int, trees: bool, tokens: int, seconds: float) -> None:
        self.log.append((batch, trees, tokens, seconds))
        super().record(batch, trees, tokens, seconds)


def rate(rounds: list) -> float:
    return sum(r[2] for r in rounds) / max(sum(r[3] for r in rounds), 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = load_prompts(a.prompts)[:a.batch]
    m = draftheads.load(dtype="float32")
    costs = Logged()
    batch = BatchDecoder(m.decoder, a.batch, 2048, None, m.batch_trees, None, costs, m.batch_cuts)
    gens = [m.iter_generate(p, max_new_tokens=10**6, batch=batch) for p in prompts]
    for g in gens:
        next(g)  # the prefill
    for _ in range(a.rounds):
        batch.step()
        for i, g in enumerate(gens):
            chunk = next(g, None)
            if chunk is None or chunk.result is not None:
                g.close()
                gens[i] = m.iter_generate(prompts[i], max_new_tokens=10**6, batch=batch)
                next(gens[i])
    log = [r for r in costs.log if r[0] == a.batch]
    beside = [any(0 <= j < len(log) and log[j][1] != r[1] for j in (i - 1, i + 1)) for i, r in enumerate(log)]
    s = costs.summary().get(a.batch, {})
    print(f"{a.batch} sequences, {len(log)} rounds decided; the model's recent pairs: trees over plain "
          f"{s.get('trees_over_plain', 0):.3f} ({s.get('pairs', 0)} pairs)")
    for kind in (True, False):
        mine = [r for r in log if r[1] == kind]
        paired = [r for r, b in zip(log, beside) if r[1] == kind and b]
        rest = [r for r, b in zip(log, beside) if r[1] == kind and not b]
        name = "with lookup/trees" if kind else "plain"
        print(f"{name:18s} all {len(mine):4d} rounds {rate(mine):7.1f} tokens/s; next to the other kind {len(paired):4d} "
              f"{rate(paired):7.1f} ({1e3 * statistics.mean(r[3] for r in paired) if paired else 0:.2f} ms); "
              f"the rest {len(rest):4d} {rate(rest):7.1f} ({1e3 * statistics.mean(r[3] for r in rest) if rest else 0:.2f} ms)")
    trees, plain = [r for r in log if r[1]], [r for r in log if not r[1]]
    if trees and plain:
        print(f"every round: trees over plain {rate(trees) / rate(plain):.3f}")


if __name__ == "__main__":
    main()
