"""Does torch.compile speed up the lean forward on this machine? Compiles the default backbone's
Llama-family forward with Inductor (weights frozen as constants; `--mode max-autotune` adds
Inductor's own C++ GEMM templates) and times it against the eager `LlamaForward.hidden`, step by step
as the cache grows, on two identical caches; prints compile time (the first calls) and the largest
output difference.

Two variants of the compiled step:
- `graph-cache`: `LlamaForward.hidden` itself, so the KV-cache writes are inside the graph;
- `opaque-cache`: the same math with the cache write + attention as one custom op that mutates the
  cache in place, so Inductor never copies the cache tensor.

    .venv/bin/python scripts/compile_experiment.py [--variant opaque-cache|graph-cache]
        [--mode default|max-autotune] [--sizes 1,4] [--threads 2]

Results on this project's 2-core CPU are in docs/verify_profile.md; the loop does not compile.
"""

import argparse
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from draftheads.backbone import load_backbone
from draftheads.generate import Decoder
from draftheads.kvcache import TreeKVCache
from draftheads.llama_forward import rms_norm
from draftheads.tree import chain, load_tree


@torch.library.custom_op("draftheads_experiment::cached_attention", mutates_args=("kv",))
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int, start: int,
                     mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Write k, v [1, kv_heads, n, d] at [start, start+n) of kv[layer] and attend q [1, heads, n, d]
    over [0, start+n). kv: TreeKVCache.kv [layers, 2, 1, kv_heads, capacity, d]."""
    end = start + k.shape[2]
    kv[layer, 0, :, :, start:end] = k
    kv[layer, 1, :, :, start:end] = v
    return F.scaled_dot_product_attention(q, kv[layer, 0, :, :, :end], kv[layer, 1, :, :, :end], attn_mask=mask,
                                          scale=scale, enable_gqa=True).contiguous()


@cached_attention.register_fake
def _(q, k, v, kv, layer, start, mask, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def opaque_cache_hidden(lean, kv, ids, positions, start: int, mask):
    """LlamaForward.hidden with the cache write + attention as one opaque op. ids [n] -> [n, hidden]."""
    n, d = ids.numel(), lean.head_dim
    x = lean.embed(ids)
    cos, sin = lean.rotary(x, positions.view(1, -1))
    for i, layer in enumerate(lean.layers):
        at, mlp = layer.self_attn, layer.mlp
        h = rms_norm(x, layer.input_layernorm)
        qs = F.linear(h, at.q_proj.weight, at.q_proj.bias).view(1, n, -1, d).transpose(1, 2)
        ks = F.linear(h, at.k_proj.weight, at.k_proj.bias).view(1, n, -1, d).transpose(1, 2)
        vs = F.linear(h, at.v_proj.weight, at.v_proj.bias).view(1, n, -1, d).transpose(1, 2)
        qs, ks = apply_rotary_pos_emb(qs, ks, cos, sin)
        o = cached_attention(qs, ks, vs, kv, i, start, mask, lean.scaling)
        x = x + F.linear(o[0].transpose(0, 1).reshape(n, -1), at.o_proj.weight, at.o_proj.bias)
        h = rms_norm(x, layer.post_attention_layernorm)
        x = x + F.linear(mlp.act_fn(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                         mlp.down_proj.weight)
    return rms_norm(x, lean.norm)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["opaque-cache", "graph-cache"], default="opaque-cache")
    ap.add_argument("--mode", choices=["default", "max-autotune"], default="default")
    ap.add_argument("--sizes", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_backbone().model
    lean = Decoder(model).lean
    options = {"freezing": True}
    if args.mode == "max-autotune":
        options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
    if args.variant == "graph-cache":
        compiled_fn = torch.compile(lean.hidden, options=options)

        def compiled(cache, ids, positions, mask):
            return compiled_fn(cache, ids, positions, mask)
    else:
        compiled_fn = torch.compile(opaque_cache_hidden, options=options)

        def compiled(cache, ids, positions, mask):
            start = cache.length
            out = compiled_fn(lean, cache.kv, ids, positions, start, mask)
            for layer in cache.layers:  # what TreeKVCache.append does, outside the graph
                layer.length = start + ids.numel()
            return out

    C = args.context
    ctx = torch.randint(100, 20000, (C,), generator=torch.Generator().manual_seed(0))
    eager_cache, compiled_cache = (TreeKVCache.for_model(model, C + 200) for _ in range(2))
    causal = torch.full((C, C), torch.finfo(torch.float32).min).triu(1)
    for cache in (eager_cache, compiled_cache):
        lean.hidden(cache, ctx, torch.arange(C), cache.attention_mask(causal))
    for n in [int(a) for a in args.sizes.split(",")]:
        tt = (chain(0) if n == 1 else load_tree(f"medusa{n - 1}", 4)).tensors("cpu", torch.float32)
        ids = torch.arange(n) + 500
        times = {"eager": [], "compiled": []}
        for step in range(12):
            L = eager_cache.length
            out = {}
            for name, fn, cache in (("eager", lean.hidden, eager_cache), ("compiled", compiled, compiled_cache)):
                t = time.perf_counter()
                mask = cache.attention_mask(tt.tree_bias) if n > 1 else None
                out[name] = fn(cache, ids, tt.depths + L, mask)
                times[name].append(time.perf_counter() - t)
                cache.keep([0], L)  # one token kept per step: the cache length changes every step
            if step < 3:
                print(f"{n} nodes, step {step}: eager {times['eager'][-1] * 1e3:.1f} ms, compiled "
                      f"{times['compiled'][-1] * 1e3:.1f} ms, max |diff| {(out['eager'] - out['compiled']).abs().max():.1e}",
                      flush=True)
        print(f"{n} nodes, median of steps 4-11: eager {statistics.median(times['eager'][4:]) * 1e3:.1f} ms, "
              f"compiled {statistics.median(times['compiled'][4:]) * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
