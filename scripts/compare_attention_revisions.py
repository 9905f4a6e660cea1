"""The C++ attention (layer_ops.attention) of another git revision against the working tree's, in one process:
the revision's csrc/ is built beside this one, then one call over a cache is timed at the default model's
heads (9 query heads over 3 kv heads of 64) for each shape, the two alternating, median of 7 blocks of 100
calls (2 threads by default). Also says whether the two give the same floats.

    .venv/bin/python scripts/compare_attention_revisions.py --against HEAD~1 [--threads 2] [--kv-cache float16|float32]

A shape is B sequences x Q new rows over L cached keys: 1 x 1 a plain step, 1 x 2-4 a chain's verify, 8 x 1
a batched plain pass of 8 requests.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from compare_packed_revisions import files_at  # scripts/ is on sys.path when a script in it runs
from draftheads import few_rows, layer_ops

SHAPES = [(1, 1, 200), (1, 1, 400), (1, 2, 300), (1, 3, 300), (1, 4, 300), (2, 1, 300), (2, 2, 300), (4, 1, 300),
          (8, 1, 300), (8, 2, 300)]


def attention_at(rev: str, into: Path):
    """The layer ops of git revision `rev`, built from a copy of its csrc/ in `into`."""
    files_at(rev, ["csrc/"], into)
    module = few_rows.build(into / "csrc" / "layer_ops.cpp", f"the layer ops of {rev}")
    assert module is not None, f"the layer ops of {rev} did not build here"
    return module.attention


def per_call_us(fn, args, calls: int = 100) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - t) / calls * 1e6


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="a git revision whose attention to compare")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache", choices=["float16", "float32"], default="float16",
                    help="what the keys and values are stored in (the cache's default: float16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        kernels = {args.against: attention_at(args.against, Path(tmp)), "working tree": layer_ops.load().attention}
        g = torch.Generator().manual_seed(0)
        print(f"{args.threads} threads, keys and values in {args.kv_cache}, us a call (median of 7 blocks of 100), "
              f"{args.against} against the working tree\n")
        print(f"| sequences x rows | keys | {args.against} | working tree | ratio | same floats |\n|---|---:|---:|---:|---:|---|")
        for b, q, keys in SHAPES:
            x = (torch.randn(b, q, 9, 64, generator=g), *torch.randn(2, b, 3, keys, 64, generator=g).to(getattr(torch, args.kv_cache)))
            mask = torch.where(torch.rand(b, 1, q, keys, generator=g) < 0.1, torch.finfo(torch.float32).min, 0.0)
            call = (*x, mask if q > 1 or b > 1 else layer_ops.EMPTY, 0.125)
            same = torch.equal(*(fn(*call) for fn in kernels.values()))
            times = {k: [] for k in kernels}
            for rep in range(7):
                for k in (list(kernels) if rep % 2 == 0 else list(kernels)[::-1]):
                    times[k].append(per_call_us(kernels[k], call))
            old, new = (statistics.median(times[k]) for k in kernels)
            print(f"| {b} x {q} | {keys} | {old:.1f} | {new:.1f} | {new / old:.3f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
