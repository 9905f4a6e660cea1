"""Profile one verify pass of the default backbone: time per forward over N new tokens after a
200-token context, in plain transformers (DynamicCache, built-in causal mask) and in our loop's
machinery (preallocated cache, tree mask, LM head on the new rows only) four ways: transformers'
forward with stock F.linear, the same with cpu_matmul's few-row kernels, the lean Llama-family forward
with torch's small ops between the products, the same with the C++ layer ops (layer_ops.py) called one by
one, and the lean forward the loop runs (the whole stack in one C++ call where it applies, decoder_stack.py,
else the ops one by one); then a torch.profiler breakdown of the lean forward at 1, 16 and 64 nodes.

    .venv/bin/python scripts/profile_verify.py [--threads 2] [--repeats 10] [--profile-sizes 1,16,64]
        [--device cuda] [--dtype bfloat16]

On a GPU (`--device cuda`, bf16 by default there) every timed forward ends with a device sync; the
two "generic" variants are then the same (cpu_matmul is CPU-only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from draftheads import decoder_stack, layer_ops
from draftheads.backbone import load_backbone
from draftheads.generate import Decoder
from draftheads.kvcache import cache_keyword
from draftheads.kvcache import TreeKVCache
from draftheads.tree import chain, load_tree

SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]


def tree_of_size(n: int):
    return chain(0) if n == 1 else load_tree(f"medusa{n - 1}", 4)


def median_ms(fn, repeats: int) -> float:
    def timed():
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels are asynchronous: time their completion
        return time.perf_counter() - t

    timed()  # warm-up
    times = [timed() for _ in range(repeats)]
    return statistics.median(times) * 1e3


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--profile-sizes", default="1,16,64")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_backbone(device=args.device, dtype=args.dtype).model
    decoder = Decoder(model)
    dev, dtype = decoder.device, decoder.dtype
    ctx = torch.randint(100, 20000, (args.context,), generator=torch.Generator().manual_seed(0)).to(dev)

    # Plain transformers: a DynamicCache over the context, cropped back after each timed forward.
    hf_cache = DynamicCache(config=model.config)
    model(ctx.view(1, -1), use_cache=True, **{cache_keyword(model): hf_cache})

    def hf_forward(n):
        ids = torch.randint(100, 20000, (1, n), device=dev)
        model(ids, use_cache=True, **{cache_keyword(model): hf_cache})
        hf_cache.crop(-n)

    # Ours: preallocated cache, tree mask, LM head on the tree rows; three variants of the forward.
    cache = TreeKVCache.for_model(model, args.context + 64)
    causal = torch.full((args.context, args.context), torch.finfo(dtype).min, dtype=dtype, device=dev).triu(1)
    decoder.engine._forward(cache, ctx, torch.arange(args.context, device=dev), causal)
    lean = decoder.lean

    def our_forward(n, variant="lean"):
        # "generic, stock": transformers' forward on our cache, stock F.linear; "generic": the same
        # with cpu_matmul's few-row kernels; "lean": llama_forward (what the loop runs for this model),
        # "lean, torch's ops" without the C++ layer ops, "lean, op by op" with them but not the decoder stack.
        decoder.lean, decoder.fast_linear = (lean if variant.startswith("lean") else None), variant != "generic, stock"
        layer_ops.ENABLED = variant != "lean, torch's ops"
        decoder_stack.ENABLED = variant == "lean"
        tt = tree_of_size(n).tensors(dev, dtype)
        ids = torch.randint(100, 20000, (n,), device=dev)
        h = decoder.engine._forward(cache, ids, tt.depths + args.context, tt.tree_bias)
        decoder.logits(h)
        cache.keep([0], args.context)
        for layer in cache.layers:  # drop the root too: every repeat starts from the same context
            layer.length = args.context
        decoder.lean, decoder.fast_linear = lean, True

    variants = ["generic, stock", "generic", "lean, torch's ops", "lean, op by op", "lean"]
    rows = []
    for n in SIZES:  # the variants interleaved per size, so drift hits all alike
        rows.append([median_ms(lambda: hf_forward(n), args.repeats)] +
                    [median_ms(lambda: our_forward(n, v), args.repeats) for v in variants])
    base = rows[0]
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, threads={torch.get_num_threads()}"
    print(f"{where}, {dtype}, context={args.context}, median of {args.repeats}")
    names = ["transformers"] + [f"ours, {v}" for v in variants]
    print("| new tokens | " + " | ".join(f"{name} ms | x 1-token" for name in names) + " |")
    print("|---:|" + "---:|---:|" * len(names))
    for n, row in zip(SIZES, rows):
        print(f"| {n} | " + " | ".join(f"{ms:.1f} | {ms / b:.2f}" for ms, b in zip(row, base)) + " |")

    from torch.profiler import ProfilerActivity, profile
    for n in [int(x) for x in args.profile_sizes.split(",") if x.strip()]:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                our_forward(n)
        print(f"\n### ours, {n} nodes (3 passes)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
