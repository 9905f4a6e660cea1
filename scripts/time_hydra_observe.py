"""Hydra++'s prefix layer at decode time: `HydraHeads.observe` (LlamaForward's code, a TreeKVCache) against
the same layer through transformers' forward with a DynamicCache, after a 200-position prompt, observing
2 positions per call (a typical accepted path), 50 calls, per dtype. docs/results.md, "2026-12-03".

    .venv/bin/python scripts/time_hydra_observe.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

import draftheads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in ("float32", "bfloat16"):
        heads = draftheads.load(heads="hydra", dtype=dtype, lookup=False).heads
        x = torch.randn(300, heads.cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(heads.dtype)
        with torch.inference_mode():
            heads.reset()
            heads.observe(x[:200])
            t = time.perf_counter()
            for i in range(50):
                heads.observe(x[200 + 2 * i:202 + 2 * i])
            lean = (time.perf_counter() - t) / 50
            cache = DynamicCache()
            heads.prefix(inputs_embeds=x[None, :200], use_cache=True, cache=cache)
            t = time.perf_counter()
            for i in range(50):
                heads.prefix(inputs_embeds=x[None, 200 + 2 * i:202 + 2 * i], use_cache=True, cache=cache)
            stock = (time.perf_counter() - t) / 50
        print(f"{dtype}: observe of 2 positions {lean * 1e3:.2f} ms; transformers' forward {stock * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
