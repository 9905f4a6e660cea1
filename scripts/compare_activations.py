"""The packed kernel with float32 activations (few_rows.packed_linear: x as it is) against int8 ones
(packed_linear_q8: x rounded to 8 bits per block of 32 inputs), in one process: 30 layers of SmolLM2-135M-shaped
Q4_1 weights and the Q8_0 LM head [49152, 576], at each row count, the two kernels alternating, median of 9
passes (2 threads by default). Also gives the largest difference the rounding makes, relative to the outputs'
largest magnitude.

    .venv/bin/python scripts/compare_activations.py [--rows 1,2,3,4,8,16,32,64] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from compare_packed_revisions import q8_0_head

from draftheads import few_rows
from draftheads.cpu_matmul import SHAPES


def median_ms(fn, packs, xs, repeats: int = 9) -> float:
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        for p in packs:
            fn(xs[p.q.shape[1]], p.q, p.d, few_rows._EMPTY if p.m is None else p.m, p.out, few_rows._EMPTY)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1e3


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,3,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernel = few_rows.load()
    assert kernel is not None, "the C++ kernel did not build here"
    g = torch.Generator().manual_seed(0)
    layers = [few_rows.pack(few_rows.q4_1_values(o, i, g)) for _ in range(30) for o, i in SHAPES]
    head = [few_rows.pack(q8_0_head(g))]
    print(f"threads={args.threads}; ms, median of 9; difference: max |int8 - float32| / max |float32|")
    print("| rows | 30 layers float32 | 30 layers int8 | x | LM head float32 | LM head int8 | x | difference |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in [int(r) for r in args.rows.split(",")]:
        xs = {k: torch.randn(rows, k, generator=g) for k in (576, 1536)}
        t = {}
        for name, packs in (("layers", layers), ("head", head)):
            for fn in (kernel.packed_linear, kernel.packed_linear_q8):
                t[name, fn.__name__] = median_ms(fn, packs, xs)
        p = layers[4]  # gate_proj
        a = kernel.packed_linear(xs[576], p.q, p.d, p.m, p.out, few_rows._EMPTY)
        b = kernel.packed_linear_q8(xs[576], p.q, p.d, p.m, p.out, few_rows._EMPTY)
        diff = ((a - b).abs().max() / a.abs().max()).item()
        f, q = ("packed_linear", "packed_linear_q8")
        print(f"| {rows} | {t['layers', f]:.2f} | {t['layers', q]:.2f} | {t['layers', f] / t['layers', q]:.2f} | "
              f"{t['head', f]:.2f} | {t['head', q]:.2f} | {t['head', f] / t['head', q]:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
