"""Micro-benchmark behind cpu_matmul.py: 30 layers of SmolLM2-135M-shaped fp32 weights (out of cache,
like the real model), rows x weights as F.linear(x, W), as (W @ x.T).T, as cpu_matmul.padded_linear
((W @ x.T).T with the rows zero-padded to a power of two), as the C++ kernel (few_rows.py, where it
builds), as the C++ kernel on the same shapes held in Q4_1 blocks (few_rows.packed_linear, as the default
model's weights are) and as cpu_matmul.linear (the kernel routes() chose for the row count), median of 7
passes.

    .venv/bin/python scripts/bench_linear.py [--threads 2]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from draftheads import few_rows
from draftheads.cpu_matmul import SHAPES, linear, padded_linear



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(ap.parse_args().threads)
    weights = [torch.randn(o, i) for _ in range(30) for o, i in SHAPES]
    g = torch.Generator().manual_seed(0)
    packs = [few_rows.pack(few_rows.q4_1_values(o, i, g)) for _ in range(30) for o, i in SHAPES]

    def pass_ms(rows: int, how: str) -> float:
        xs = {i: torch.randn(rows, i) for i in (576, 1536)}

        def run():
            for w, p in zip(weights, packs):
                x = xs[w.shape[1]]
                if how == "F.linear":
                    F.linear(x, w)
                elif how == "(W @ x.T).T":
                    (w @ x.T).T
                elif how == "padded":
                    padded_linear(x, w)
                elif how == "few_rows (C++)":
                    few_rows.linear(x, w)
                elif how == "Q4_1 blocks (C++)":
                    few_rows.packed_linear(x, p)
                else:
                    linear(x, w)

        run()
        times = []
        for _ in range(7):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    hows = ["F.linear", "(W @ x.T).T", "padded"] + (["few_rows (C++)", "Q4_1 blocks (C++)"] if few_rows.load() is not None else [])
    hows.append("cpu_matmul.linear")
    print("| rows | " + " | ".join(f"{h} ms" for h in hows) + " |\n|---:|" + "---:|" * len(hows))
    for rows in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        print(f"| {rows} | " + " | ".join(f"{pass_ms(rows, h):.1f}" for h in hows) + " |", flush=True)


if __name__ == "__main__":
    main()
