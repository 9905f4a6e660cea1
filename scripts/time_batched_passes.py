"""Plain batched passes of `--batch` sequences (BatchDecoder, the tree the heads' table gives at that size),
per model loaded in one process, in the order `--models` names them, timed in blocks of 5 passes that
alternate between the models (the first block of each untimed). Prints the median and mean ms per pass
per model, and how much of the process's memory sits in transparent huge pages.

Three uses: whether the heads server's plain passes cost more than the plain server's (load both, in
either order), what the KV cache's dtype does to a pass (a model is HEADS[:KV], KV float32 or float16: the
cache setting its batch is made under, README --kv-cache), and whether huge pages for torch's allocations change
a pass (`THP_MEM_ALLOC_ENABLE=1` against none, one model per process).

    python scripts/time_batched_passes.py --prompts runs/batch_tune_prompts.jsonl --models default,none
    python scripts/time_batched_passes.py --prompts runs/batch_tune_prompts.jsonl --models none,default
    python scripts/time_batched_passes.py --prompts P --models none:float32,none:float16 --blocks 40
    THP_MEM_ALLOC_ENABLE=1 python scripts/time_batched_passes.py --prompts runs/batch_tune_prompts.jsonl --models none

Use prompts that are neither training nor evaluation data (scripts/unused_prompts.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import draftheads
from draftheads import kvcache
from draftheads.acceptance import SamplingConfig
from draftheads.batch import BatchDecoder
from draftheads.generate import Stats
from draftheads.round_costs import RoundCosts
from draftheads.train.prompts import load_prompts


class _PlainRounds(RoundCosts):
    """Served rounds that always chose plain decoding."""

    def use_trees(self, batch: int, margin: float = 1.0) -> bool:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--models", default="default,none",
                    help="heads per model, in load order (none: no heads), each optionally :float32 or :float16 (its cache)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=24)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", choices=["table", "plain"], default="table",
                    help="table: every pass takes the table's tree, prompt lookup's branches included (a server without "
                         "--adapt-trees); plain: every pass is the plain round the served rounds choose where no tree pays "
                         "(nothing drafted; the drafters still observe)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = load_prompts(a.prompts)[:a.batch]
    runs, kv_default = {}, kvcache.kv_cache()
    for spec in a.models.split(","):
        heads, _, kv = spec.partition(":")
        # the setting is process-wide: a model without :KV takes the one the process started with, not the last named
        m = draftheads.load(heads=None if heads == "none" else heads, dtype=a.dtype, kv_cache=kv or kv_default)
        costs = _PlainRounds() if a.rounds == "plain" else None
        batch = BatchDecoder(m.decoder, a.batch, 2048, None, m.batch_trees, None, costs, m.batch_cuts)
        gens = []
        for p in prompts:
            g = batch.steps(m.prompt_ids([{"role": "user", "content": p}]), 1000, SamplingConfig(), Stats())
            next(g)  # the prefill
            gens.append(g)
        print(f"{spec}: the tree at {a.batch} sequences has {batch.tree_at(a.batch, m.decoder.tree).size} node(s), "
              f"the cache {batch.cache.kv.dtype}")
        runs[spec] = (batch, gens, [])

    def block(name: str) -> float:
        batch, gens, _ = runs[name]
        t = time.perf_counter()
        for _ in range(5):
            batch.step()
            for g in gens:
                next(g)
        return (time.perf_counter() - t) / 5

    for name in runs:
        block(name)  # warm-up
    names = list(runs)
    for k in range(a.blocks):
        for name in names if k % 2 == 0 else names[::-1]:
            runs[name][2].append(block(name))
    for name, (_, _, times) in runs.items():
        print(f"{name}: {1e3 * statistics.median(times):.1f} ms a pass (median), {1e3 * statistics.mean(times):.1f} mean")
    huge = [line.split()[1] for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")]
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, anonymous huge pages: {huge[0] if huge else '?'} kB")


if __name__ == "__main__":
    main()
