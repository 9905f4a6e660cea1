"""A bf16 row-exact verify pass of B sequences' chains: one attention call per layer (row_attention.py)
against one call per node per layer (what the lean forward did before, and still does where the probe
finds batched rows inexact). Default model, lean forward, LM head on every row; the two variants
alternate within each cell, medians in ms.

    .venv/bin/python scripts/bench_row_attention.py --threads 2 --repeats 12

--ragged adds a table of passes whose sequences have chains of different lengths (trees cut to their
confident nodes, batch.py), their padding packed out of the products, against the same sequences at
the longest chain: "3,2,2,3,2,1,2,2;2,1,2,1,2,1,2,1" (chain nodes per sequence; passes separated by ;).

--new-shapes times one rows_attention call (two bf16 products) over cached keys whose count grows by one a
call, as a row-exact step's did before kvcache.KEY_BLOCK, against the same calls over a count already seen:
oneDNN builds a product for each new shape.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import draftheads
import draftheads.llama_forward as lf
from draftheads.kvcache import SlotKVCache


def new_shapes(calls: int = 400, rows: int = 3, kv_heads: int = 3, g: int = 3, d: int = 64) -> None:
    """us per rows_attention call of `rows` chain nodes (the default model's attention shape) over a cache
    view of n keys: n new every call (600, 601, ...), then n seen before (600 each time)."""
    from draftheads.row_attention import chain_visibility, rows_attention

    cache = torch.randn(1, kv_heads, 600 + calls + rows, d).bfloat16()
    q = torch.randn(1, kv_heads * g, rows, d).bfloat16()

    def per_call(counts: list[int]) -> float:
        t = time.perf_counter()
        for n in counts:
            rows_attention(q, cache[:, :, :n + rows], cache[:, :, :n + rows], chain_visibility(torch.tensor([n]), rows, n + rows, g), 0.125)
        return (time.perf_counter() - t) / len(counts) * 1e6
    grown, seen = per_call(list(range(600, 600 + calls))), per_call([600] * calls)
    print(f"rows_attention over a new key count: {grown:.0f} us a call; over one seen before: {seen:.0f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--context", type=int, default=200, help="cached tokens per sequence (each adds 7 x its index)")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--nodes", default="1,2,3,4")
    ap.add_argument("--ragged", default="", help="chain nodes per sequence, passes separated by ';'")
    ap.add_argument("--new-shapes", action="store_true", help="only: attention over a new key count vs a built one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.new_shapes:
        return new_shapes()
    m = draftheads.load(heads=None, dtype=torch.bfloat16)
    engine = m.decoder.engine
    exact = lf.batched_rows_are_exact
    print(f"batched rows exact on this CPU: {exact(torch.bfloat16, args.threads)}")

    def one_pass(B: int, q: int, per_node: bool, sizes: list[int] | None = None) -> float:
        """One pass of B sequences with q chain nodes each, or with sizes[s] nodes (packed)."""
        lf.batched_rows_are_exact = (lambda *shape: False) if per_node else exact
        sizes = sizes or [q] * B
        cache = SlotKVCache.for_model(engine.model, B, args.context + 8 * B + q)
        cache.lengths[:B] = torch.arange(B) * 7 + args.context
        ids = torch.randint(0, 40000, (B, q))
        positions = cache.lengths[:B, None] + torch.arange(q)
        rows = torch.cat([torch.arange(n) + s * q for s, n in enumerate(sizes)])  # the real rows
        t = time.perf_counter()
        with torch.inference_mode():
            cache.begin_step(B, q)
            h = engine.lean.hidden(cache, ids, positions, None, {s: tuple(range(-1, n - 1)) for s, n in enumerate(sizes)},
                                   rows)  # [B, q, H]
            engine.logits(h.reshape(B * q, -1)[rows])
        return time.perf_counter() - t

    print("| sequences | chain nodes | rows | one call per layer (ms) | one call per node (ms) | per node / one call |")
    print("|---:|---:|---:|---:|---:|---:|")
    try:
        for B in map(int, args.batches.split(",")):
            for q in map(int, args.nodes.split(",")):
                times = {False: [], True: []}
                for r in range(args.repeats + 2):
                    for per_node in (False, True) if r % 2 == 0 else (True, False):
                        times[per_node].append(one_pass(B, q, per_node))
                one, each = (1e3 * statistics.median(times[k][2:]) for k in (False, True))
                print(f"| {B} | {q} | {B * q} | {one:.1f} | {each:.1f} | {each / one:.2f} |", flush=True)
        for spec in filter(None, args.ragged.split(";")):
            sizes = [int(n) for n in spec.split(",")]
            B, q = len(sizes), max(sizes)
            if spec == args.ragged.split(";")[0]:
                print("\n| sequences | chain nodes | real rows | packed (ms) | every sequence at the longest (ms) |")
                print("|---:|---|---:|---:|---:|")
            times = {False: [], True: []}
            for r in range(args.repeats + 2):
                for full in (False, True) if r % 2 == 0 else (True, False):
                    times[full].append(one_pass(B, q, False, None if full else sizes))
            cut, whole = (1e3 * statistics.median(times[k][2:]) for k in (False, True))
            print(f"| {B} | {spec} | {sum(sizes)} | {cut:.1f} | {whole:.1f} |", flush=True)
    finally:
        lf.batched_rows_are_exact = exact


if __name__ == "__main__":
    main()
