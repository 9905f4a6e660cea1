"""The batch cache's per-layer write and read (kvcache.SlotKVCache.append) of another git revision against the
working tree's, in one process, at the default model's cache shapes (30 layers, 3 kv heads of 64, 2048
columns, 8 slots, 200 cached entries a slot, a 2-node step), for 1, 2 and 8 sequences; and the serial
decoder's cache write (TreeKVCache.append) beside them. Microseconds a layer, median of 300 steps, 2 threads.

    .venv/bin/python scripts/bench_slot_cache.py --against 2682969
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from compare_packed_revisions import files_at  # scripts/ is on sys.path when a script in it runs
from draftheads import kvcache

LAYERS, HEADS, DIM, CAPACITY, SLOTS, CACHED, Q = 30, 3, 64, 2048, 8, 200, 2


def kvcache_at(rev: str, into: Path):
    """kvcache.py of git revision `rev`, imported inside the draftheads package (for its relative imports)."""
    files_at(rev, ["kvcache.py"], into)
    spec = importlib.util.spec_from_file_location("draftheads._kvcache_at_rev", into / "kvcache.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slot_us(module, n: int) -> float:
    """us a layer of `append` for a step of Q nodes in each of n slots."""
    cache = module.SlotKVCache(LAYERS, SLOTS, CAPACITY, HEADS, DIM, torch.float32, "cpu")
    cache.lengths[:] = CACHED
    keys, values, bias = torch.randn(n, HEADS, Q, DIM), torch.randn(n, HEADS, Q, DIM), torch.zeros(n, Q, Q)
    times = []
    for _ in range(300):
        cache.tree_mask(bias)  # begins the step
        t = time.perf_counter()
        for layer in range(LAYERS):
            cache.append(layer, keys, values)
        times.append((time.perf_counter() - t) / LAYERS * 1e6)
    return statistics.median(times)


def tree_us() -> float:
    cache = kvcache.TreeKVCache(LAYERS, CACHED + Q, torch.float32, "cpu")
    prefix = torch.randn(1, HEADS, CACHED, DIM)
    for layer in range(LAYERS):
        cache.append(layer, prefix, prefix)
    keys, values = torch.randn(1, HEADS, Q, DIM), torch.randn(1, HEADS, Q, DIM)
    times = []
    for _ in range(300):
        for layer in cache.layers:
            layer.length = CACHED
        t = time.perf_counter()
        for layer in range(LAYERS):
            cache.append(layer, keys, values)
        times.append((time.perf_counter() - t) / LAYERS * 1e6)
    return statistics.median(times)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", required=True, help="a git revision whose kvcache.py to compare")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        old = kvcache_at(args.against, Path(tmp))
        print(f"{args.threads} threads, us a layer (median of 300 steps of {Q} nodes)\n")
        print(f"| sequences | {args.against} | working tree |\n|---:|---:|---:|")
        for n in (1, 2, 8):
            print(f"| {n} | {slot_us(old, n):.1f} | {slot_us(kvcache, n):.1f} |", flush=True)
        print(f"\nThe serial decoder's cache (TreeKVCache.append, one sequence): {tree_us():.1f} us a layer")


if __name__ == "__main__":
    main()
