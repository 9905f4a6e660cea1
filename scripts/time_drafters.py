"""What drafting costs per step, apart from the verify pass: each shipped head set's `draft` on its
calibrated tree for the dtype, and Hydra++'s `observe` of 2 accepted positions after a 200-position prompt
(its prefix layer; Medusa heads keep no state), median of `--repeats` rounds of 50 calls, per dtype.
docs/results.md, "2026-12-04".

    .venv/bin/python scripts/time_drafters.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import draftheads


def per_call(fn, calls: int = 50, repeats: int = 5, setup=lambda: None) -> float:
    """Median over `repeats` rounds (each after an untimed `setup()`) of the mean seconds per call, after
    one warm-up round."""
    times = []
    for _ in range(repeats + 1):
        setup()
        t = time.perf_counter()
        for i in range(calls):
            fn(i)
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in ("float32", "bfloat16"):
        for name in ("default", "hydra"):
            model = draftheads.load(heads=name, dtype=dtype, lookup=False)
            heads, tree = model.heads, model.decoder.tree
            w = next(heads.parameters())
            x = torch.randn(300, heads.cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(w.dtype)
            root = torch.tensor(42)
            with torch.inference_mode():
                def prompt():  # the prefix layer's cache after a 200-position prompt (Medusa heads: nothing)
                    heads.reset()
                    heads.observe(x[:200])

                prompt()
                draft = per_call(lambda i: heads.draft(x[200 + i], root, tree), repeats=args.repeats)
                line = f"{dtype} {name}: draft on {tree.size} nodes {draft * 1e3:.2f} ms"
                if getattr(heads, "prefix", None) is not None:
                    observe = per_call(lambda i: heads.observe(x[200 + 2 * i:202 + 2 * i]), repeats=args.repeats,
                                       setup=prompt)  # each round observes positions 200-299 afresh
                    line += f"; observe of 2 positions {observe * 1e3:.2f} ms"
            print(line, flush=True)


if __name__ == "__main__":
    main()
