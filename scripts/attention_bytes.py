"""What one call of the C++ attention (layer_ops.attention) costs per (sequence, kv head, key), and the keys'
and values' bytes it reads a second, as the batch and the context grow: the default model's heads (9 query
heads over 3 kv heads of 64), one query row per sequence (a plain batched step), random float32 data, median
of --repeats calls. Small shapes stay in cache between calls; large ones are read from memory each call.

    .venv/bin/python scripts/attention_bytes.py [--threads 2] [--shapes 1x256,4x256,8x256,48x256,48x512,128x256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from draftheads import layer_ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="1x256,4x256,8x256,48x256,48x512,128x256", help="sequences x keys, comma-separated")
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    attention = layer_ops.load().attention
    print("| sequences | keys | ms a call | MB of keys and values | GB/s | ns per (sequence, kv head, key) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for shape in a.shapes.split(","):
        B, L = (int(v) for v in shape.split("x"))
        q, k, v = torch.randn(B, 1, 9, 64), torch.randn(B, 3, L, 64), torch.randn(B, 3, L, 64)
        mask = torch.zeros(B, 1, 1, L)
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            attention(q, k, v, mask, 0.125, [L] * B)
            times.append(time.perf_counter() - t)
        t, mb = statistics.median(times), 2 * k.numel() * 4 / 1e6
        print(f"| {B} | {L} | {1e3 * t:.3f} | {mb:.1f} | {mb / 1e3 / t:.1f} | {t * 1e9 / (B * 3 * L):.1f} |")


if __name__ == "__main__":
    main()
