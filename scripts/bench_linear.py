"""Micro-benchmark behind cpu_matmul.py: 30 layers of SmolLM2-135M-shaped fp32 weights (out of cache,
like the real model), rows x weights as F.linear(x, W), as (W @ x.T).T, as cpu_matmul.padded_linear
((W @ x.T).T with the rows zero-padded to a power of two), as the C++ kernel (few_rows.py, where it
builds) and as cpu_matmul.linear (the kernel routes() chose for the row count), median of 7 passes.

    .venv/bin/python scripts/bench_linear.py [--threads 2]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from draftheads import few_rows
from draftheads.cpu_matmul import linear, padded_linear

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(ap.parse_args().threads)
    weights = [torch.randn(o, i) for _ in range(30) for o, i in SHAPES]

    def pass_ms(rows: int, how: str) -> float:
        xs = {i: torch.randn(rows, i) for i in (576, 1536)}

        def run():
            for w in weights:
                x = xs[w.shape[1]]
                if how == "F.linear":
                    F.linear(x, w)
                elif how == "(W @ x.T).T":
                    (w @ x.T).T
                elif how == "padded":
                    padded_linear(x, w)
                elif how == "few_rows (C++)":
                    few_rows.linear(x, w)
                else:
                    linear(x, w)

        run()
        times = []
        for _ in range(7):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    hows = ["F.linear", "(W @ x.T).T", "padded"] + (["few_rows (C++)"] if few_rows.load() is not None else [])
    hows.append("cpu_matmul.linear")
    print("| rows | " + " | ".join(f"{h} ms" for h in hows) + " |\n|---:|" + "---:|" * len(hows))
    for rows in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        print(f"| {rows} | " + " | ".join(f"{pass_ms(rows, h):.1f}" for h in hows) + " |", flush=True)


if __name__ == "__main__":
    main()
