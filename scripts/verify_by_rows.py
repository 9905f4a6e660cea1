"""What one verify pass of the default backbone costs by its node count: a chain of N nodes after a `--context`-token
prompt, N = 1..`--max-nodes` taken in turn (so the machine's drift falls on every N alike), through the engine the loop
runs (TorchEngine.verify: the lean forward, the LM head on every node); the cache is cut back to the prompt after each
pass. Prints the median ms a pass per N and the step from N - 1: where a further node costs more than its neighbours,
a kernel's row grouping is the first suspect (docs/verify_profile.md, stop 62).

    .venv/bin/python scripts/verify_by_rows.py [--context 300] [--max-nodes 10] [--repeats 120] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import draftheads
from draftheads.generate import ROOT_ONLY
from draftheads.tree import chain


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--max-nodes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=120)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    engine = draftheads.load(heads=None, lookup=False).decoder.engine
    g = torch.Generator().manual_seed(0)
    cache = engine.new_cache(a.context + a.max_nodes + 1)
    engine.prefill(cache, torch.randint(100, 20000, (a.context,), generator=g), "none")
    L = cache.length
    trees = {n: chain(n - 1) if n > 1 else ROOT_ONLY for n in range(1, a.max_nodes + 1)}
    times: dict[int, list[float]] = {n: [] for n in trees}
    for _ in range(a.repeats + 1):  # the first round warms up
        for n, tree in trees.items():
            ids = torch.randint(100, 20000, (n,), generator=g)
            t = time.perf_counter()
            engine.verify(cache, ids, tree)
            times[n].append(time.perf_counter() - t)
            cache.keep([], L)  # back to the prompt alone: every pass sees the same context
    print(f"{a.threads} threads, {a.context}-token context, median of {a.repeats} passes\n")
    print("| nodes | ms a pass | step from one node fewer |\n|---:|---:|---:|")
    prev = None
    for n, ts in times.items():
        ms = 1000 * statistics.median(ts[1:])
        print(f"| {n} | {ms:.3f} | {'' if prev is None else f'{ms - prev:+.3f}'} |")
        prev = ms


if __name__ == "__main__":
    main()
