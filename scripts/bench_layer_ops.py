"""Micro-benchmark behind layer_ops.py: one call of each small op of a decoder layer, torch's against the C++
layer ops, at the default model's shapes (hidden 576, 9 query heads over 3 kv heads of 64, intermediate
1536), 2 threads by default, microseconds a call (mean over 2,000 calls after 100 warm-up calls).

    .venv/bin/python scripts/bench_layer_ops.py [--threads 2] [--keys 201]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from draftheads import layer_ops


def us(fn, n: int = 2000) -> float:
    for _ in range(100):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keys", type=int, default=201, help="cached keys the attention reads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    assert layer_ops.load() is not None, "the C++ layer ops did not build here"
    norm = torch.nn.Module()
    norm.weight, norm.variance_epsilon = torch.rand(576) + 0.5, 1e-5
    x, d = torch.randn(1, 576), torch.randn(1, 576)
    qkv, cos, sin = torch.randn(1, 15 * 64), torch.randn(1, 64), torch.randn(1, 64)
    q4, k4 = qkv[:, :576].view(1, 1, 9, 64).transpose(1, 2), qkv[:, 576:768].view(1, 1, 3, 64).transpose(1, 2)
    gate, up = torch.randn(1, 1536), torch.randn(1, 1536)
    rows = [("RMSNorm (C++: with the residual add)", lambda: F.rms_norm(x, (576,), norm.weight, 1e-5),
             lambda: layer_ops.add_rms_norm(x.clone(), d, norm)),
            ("rotary on q and k", lambda: apply_rotary_pos_emb(q4, k4, cos[None], sin[None]),
             lambda: layer_ops.rope_(qkv, cos, sin, 12)),
            ("SiLU(gate) * up", lambda: F.silu(gate) * up, lambda: layer_ops.silu_mul(gate, up))]
    for n in (1, 3):
        q = torch.randn(1, n, 9, 64)
        keys, values = torch.randn(2, 1, 3, a.keys + n, 64)
        mask = torch.zeros(1, 1, n, a.keys + n) if n > 1 else None
        rows.append((f"attention, {n} quer{'y' if n == 1 else 'ies'} over {a.keys + n} keys",
                     lambda q=q, k=keys, v=values, m=mask: F.scaled_dot_product_attention(
                         q.transpose(1, 2), k, v, attn_mask=m, scale=0.125, enable_gqa=True),
                     lambda q=q, k=keys, v=values, m=mask: layer_ops.attention(q, k, v, m, 0.125)))
    print(f"threads={torch.get_num_threads()}\n\n| op | torch us | C++ us |\n|---|---:|---:|")
    for name, torch_fn, cpp_fn in rows:
        print(f"| {name} | {us(torch_fn):.1f} | {us(cpp_fn):.1f} |")


if __name__ == "__main__":
    main()
