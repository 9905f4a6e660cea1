"""Profile one verify pass of the default backbone: time per forward over N new tokens after a
200-token context, in plain transformers (DynamicCache, built-in causal mask) and in our loop's
machinery (preallocated cache, tree mask, LM head on the new rows only) with stock F.linear and with
cpu_matmul's few-row kernels, plus a torch.profiler breakdown at 1, 16 and 64 nodes.

    .venv/bin/python scripts/profile_verify.py [--threads 2] [--repeats 10] [--profile-sizes 1,16,64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from draftheads.backbone import load_backbone
from draftheads.generate import Decoder
from draftheads.kvcache import TreeKVCache
from draftheads.tree import chain, load_tree

SIZES = [1, 2, 4, 8, 16, 32, 64]


def tree_of_size(n: int):
    return chain(0) if n == 1 else load_tree(f"medusa{n - 1}", 4)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--profile-sizes", default="1,16,64")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_backbone().model
    decoder = Decoder(model)
    ctx = torch.randint(100, 20000, (args.context,), generator=torch.Generator().manual_seed(0))

    # Plain transformers: a DynamicCache over the context, cropped back after each timed forward.
    hf_cache = DynamicCache(config=model.config)
    model(ctx.view(1, -1), past_key_values=hf_cache, use_cache=True)

    def hf_forward(n):
        ids = torch.randint(100, 20000, (1, n))
        model(ids, past_key_values=hf_cache, use_cache=True)
        hf_cache.crop(-n)

    # Ours: preallocated cache, tree mask, LM head on the tree rows.
    cache = TreeKVCache.for_model(model, args.context + 64)
    causal = torch.full((args.context, args.context), torch.finfo(torch.float32).min).triu(1)
    decoder._forward(cache, ctx, torch.arange(args.context), causal)

    def our_forward(n):
        tt = tree_of_size(n).tensors("cpu", torch.float32)
        ids = torch.randint(100, 20000, (n,))
        h = decoder._forward(cache, ids, tt.depths + args.context, tt.tree_bias)
        decoder.logits(h)
        cache.keep([0], args.context)
        for layer in cache.layers:  # drop the root too: every repeat starts from the same context
            layer.length = args.context

    def stock_forward(n):  # our machinery with stock F.linear kernels (cpu_matmul off)
        decoder.fast_linear = False
        our_forward(n)
        decoder.fast_linear = True

    rows = []
    for n in SIZES:  # the three interleaved per size, so drift hits all alike
        rows.append((n, median_ms(lambda: hf_forward(n), args.repeats), median_ms(lambda: stock_forward(n), args.repeats),
                     median_ms(lambda: our_forward(n), args.repeats)))
    base = rows[0]
    print(f"threads={torch.get_num_threads()} context={args.context} median of {args.repeats}")
    print("| new tokens | transformers ms | x 1-token | ours, stock linear ms | x 1-token | ours ms | x 1-token |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, hf, stock, ours in rows:
        print(f"| {n} | {hf:.1f} | {hf / base[1]:.2f} | {stock:.1f} | {stock / base[2]:.2f} | {ours:.1f} | {ours / base[3]:.2f} |")

    from torch.profiler import ProfilerActivity, profile
    for n in [int(x) for x in args.profile_sizes.split(",") if x.strip()]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                our_forward(n)
        print(f"\n### ours, {n} nodes (3 passes)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
