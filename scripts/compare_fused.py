"""Fused projections (LlamaForward's `fuse`: q/k/v and gate/up as one product each) against the products
apart, CPU fp32, in one process, interleaved:

1. the products alone: 30 layers of the default model's q/k/v/gate/up weights (out of cache, as in the
   real model) through cpu_matmul.linear, median ms of 12 passes per row count;
2. decoding: tokens/s of the plain loop and of the default heads, one prompt at a time (the order of
   the two variants alternating per prompt), and of `--batch` sequences at a time through the batched
   step (BatchDecoder, plain), the two variants alternating per group.

    python scripts/compare_fused.py --prompts runs/batch_tune_prompts.jsonl --limit 8 --max-new-tokens 64

Use prompts that are neither training nor evaluation data (scripts/unused_prompts.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import draftheads
from draftheads.batch import BatchDecoder, run_all
from draftheads.cpu_matmul import linear
from draftheads.train.prompts import load_prompts

SHAPES = [(576, 576), (192, 576), (192, 576), (1536, 576), (1536, 576)]  # q k v gate up: [out, in]


def products(rows_grid: list[int]) -> None:
    layers = [[torch.randn(o, i) for o, i in SHAPES] for _ in range(30)]
    fused = [[torch.cat(ws[:3]), torch.cat(ws[3:])] for ws in layers]
    print("| rows | apart ms | fused ms |\n|---|---|---|")
    for rows in rows_grid:
        x = torch.randn(rows, 576)
        times = {"apart": [], "fused": []}
        for _ in range(12):
            for name, ws in (("apart", layers), ("fused", fused)):
                t = time.perf_counter()
                for layer in ws:
                    for w in layer:
                        linear(x, w)
                times[name].append(time.perf_counter() - t)
        print(f"| {rows} | {1e3 * statistics.median(times['apart']):.2f} | {1e3 * statistics.median(times['fused']):.2f} |")


def decoding(prompts: list[str], max_new_tokens: int, batch: int) -> None:
    print("\n| decoding | apart tokens/s | fused tokens/s | same outputs |\n|---|---|---|---|")
    for heads in (None, "default"):
        m = draftheads.load(heads=heads, lookup=False)
        lean = m.decoder.lean
        runs = {False: [0, 0.0, []], True: [0, 0.0, []]}  # tokens, seconds, token ids
        for k, p in enumerate(prompts):
            for fuse in (True, False) if k % 2 == 0 else (False, True):
                lean.fuse = fuse
                t = time.perf_counter()
                r = m.generate(p, max_new_tokens=max_new_tokens)
                runs[fuse][1] += time.perf_counter() - t
                runs[fuse][0] += len(r.token_ids)
                runs[fuse][2].append(r.token_ids)
        _row(f"{heads or 'plain'} loop, one at a time", runs)
        if heads is None:
            runs = {False: [0, 0.0, []], True: [0, 0.0, []]}
            for k in range(0, len(prompts), batch):
                group = prompts[k:k + batch]
                for fuse in (True, False) if (k // batch) % 2 == 0 else (False, True):
                    lean.fuse = fuse
                    b = BatchDecoder(m.decoder, batch, 1024)
                    t = time.perf_counter()
                    out = run_all(b, [m.iter_generate(p, batch=b, max_new_tokens=max_new_tokens) for p in group])
                    runs[fuse][1] += time.perf_counter() - t
                    runs[fuse][0] += sum(len(r.token_ids) for r in out)
                    runs[fuse][2] += [r.token_ids for r in out]
            _row(f"plain, {batch} at a time (batched step)", runs)


def _row(name: str, runs: dict) -> None:
    (ta, sa, ia), (tf, sf, if_) = runs[False], runs[True]
    print(f"| {name} | {ta / sa:.1f} | {tf / sf:.1f} | {sum(a == b for a, b in zip(ia, if_))} of {len(ia)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    products([1, 2, 4, 8, 16, 40])
    decoding(load_prompts(a.prompts)[:a.limit], a.max_new_tokens, a.batch)


if __name__ == "__main__":
    main()
