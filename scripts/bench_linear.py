"""Micro-benchmark behind cpu_matmul.py: 30 layers of SmolLM2-135M-shaped fp32 weights (out of cache,
like the real model), rows x weights as F.linear(x, W) and as (W @ x.T).T, median of 7 passes.

    .venv/bin/python scripts/bench_linear.py [--threads 2]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(ap.parse_args().threads)
    weights = [torch.randn(o, i) for _ in range(30) for o, i in SHAPES]

    def pass_ms(rows: int, transposed: bool) -> float:
        xs = {i: torch.randn(rows, i) for i in (576, 1536)}

        def run():
            for w in weights:
                x = xs[w.shape[1]]
                (w @ x.T).T if transposed else F.linear(x, w)

        run()
        times = []
        for _ in range(7):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    base = None
    print("| rows | F.linear ms | x 1 row | (W @ x.T).T ms | x 1 row |\n|---:|---:|---:|---:|---:|")
    for rows in (1, 2, 4, 8, 16, 32):
        a, b = pass_ms(rows, False), pass_ms(rows, True)
        base = base or a
        print(f"| {rows} | {a:.1f} | {a / base:.2f} | {b:.1f} | {b / base:.2f} |")


if __name__ == "__main__":
    main()
