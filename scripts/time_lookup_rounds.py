"""Batched rounds of `--batch` sequences with prompt lookup's branches against plain rounds, per model loaded in one
process: plain (no heads), the default heads without lookup, and the heads with lookup in every round (its settings
as `--lookup` names them, each `BRANCHESxTOKENS`), all in blocks of `--rounds` that alternate between the models.
Prints the median ms per round and tokens/s over the rounds (a sequence that finishes starts its prompt again, its
prefill untimed). `--rows` sets batch.BATCH_LOOKUP_ROWS (each sequence's share of a pass's rows with lookup's
branches: rows // batch); a large value leaves the branches uncut, as before stop 57.

    .venv/bin/python scripts/time_lookup_rounds.py --prompts P --batch 4 [--lookup 2x5,1x5] [--rows 16]

Use prompts that are neither training nor evaluation data (scripts/unused_prompts.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import draftheads
from draftheads import batch as batch_module
from draftheads.batch import BatchDecoder
from draftheads.round_costs import RoundCosts
from draftheads.train.prompts import load_prompts


class Forced(RoundCosts):
    """Every round of two or more sequences takes the table's kind (`trees`: lookup's branches) or plain."""

    def __init__(self, trees: bool):
        super().__init__()
        self.trees = trees

    def use_trees(self, batch: int, margin: float = 1.0) -> bool:
        return self.trees


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lookup", default="2x5", help="lookup settings to time, BRANCHESxTOKENS, comma-separated")
    ap.add_argument("--rows", type=int, default=None, help="batch.BATCH_LOOKUP_ROWS (default: as shipped)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds per block")
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.rows is not None:
        batch_module.BATCH_LOOKUP_ROWS = a.rows
    prompts = load_prompts(a.prompts)[:a.batch]
    specs = {"plain": (None, False, None), "heads, no lookup": ("default", False, None)}
    for s in a.lookup.split(","):
        branches, tokens = (int(x) for x in s.split("x"))
        specs[f"heads, lookup {s}"] = ("default", {"branches": branches, "tokens": tokens}, True)
    runs = {}
    for name, (heads, lookup, forced) in specs.items():
        m = draftheads.load(heads=heads, dtype="float32", lookup=lookup)
        batch = BatchDecoder(m.decoder, a.batch, 2048, None, m.batch_trees, None,
                             None if forced is None else Forced(forced), m.batch_cuts)
        gens = [m.iter_generate(p, max_new_tokens=10**6, batch=batch) for p in prompts]
        for g in gens:
            next(g)  # the prefill
        runs[name] = {"model": m, "batch": batch, "gens": gens, "ms": [], "tokens": 0, "seconds": 0.0}

    def block(r: dict) -> None:
        batch, gens, seconds, tokens = r["batch"], r["gens"], 0.0, 0
        for _ in range(a.rounds):
            t = time.perf_counter()
            batch.step()
            seconds += time.perf_counter() - t
            tokens += sum(len(s.emitted or []) for s in batch.seqs.values())
            for i, g in enumerate(gens):
                chunk = next(g, None)
                if chunk is None or chunk.result is not None:  # finished: the same prompt again
                    g.close()
                    gens[i] = r["model"].iter_generate(prompts[i], max_new_tokens=10**6, batch=batch)
                    next(gens[i])
        r["ms"].append(1e3 * seconds / a.rounds)
        r["tokens"] += tokens
        r["seconds"] += seconds

    order = list(runs.values())
    for r in order:
        block(r)  # warm-up, kept out of the figures
        r.update(ms=[], tokens=0, seconds=0.0)
    for k in range(a.blocks):
        for r in order if k % 2 == 0 else order[::-1]:
            block(r)
    print(f"{a.batch} sequences, BATCH_LOOKUP_ROWS {batch_module.BATCH_LOOKUP_ROWS}, {a.blocks} blocks of {a.rounds} rounds")
    for name, r in runs.items():
        print(f"{name:22s} {statistics.median(r['ms']):6.2f} ms a round (median)  {r['tokens'] / r['seconds']:7.1f} tokens/s")


if __name__ == "__main__":
    main()
