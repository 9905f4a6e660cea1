"""Row-exact attention: each query row gets, bit for bit, what it gets alone, whatever shares the call.

In bf16 greedy tokens often tie, so a tree node's row must compute exactly what a plain one-token step
at its position computes, or speculative output changes (engine.row_exact). torch's fused attention
(SDPA) does not give that: over more keys (other rows' keys, masked) its softmax takes the vectorised
exp where a shorter call took the scalar tail, and 80 of 300 rows of a masked batched call differed
from the same rows alone (CPU, bf16). So the lean forward used to run one SDPA call per node per
layer: at 4 sequences with 3-node trees, 360 calls a pass, 41 us each.

`rows_attention` is attention as two bf16 products and an fp32 softmax: torch's softmax adds the
masked keys' exact zeros lane by lane and its exp is the same for every element, and oneDNN's bf16
product gives each output element the same value for any row count from two up (what two_rows in
cpu_matmul relies on too). Measured on this project's AMD EPYC (AVX512-BF16): 0 of 1,728 rows differ
between one call over 1-16 sequences of 1-8 chain nodes, 5-2,048 cached keys, and each row alone.
That holds per CPU and BLAS, not by any documented contract, so `batched_rows_are_exact()` checks it
once per process, dtype and attention shape; where it fails, each row gets a call of its own as before.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# torch's softmax reduces a row shorter than one vector (16 fp32 lanes with AVX-512) in another order
# than a longer one; with fewer keys a call is padded to this many, masked.
MIN_KEYS = 64


def rows_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """q [b, heads, rows, d] over keys/values [b, kv_heads, n, d]; visible: bool [b, 1, rows * g, n] (g =
    heads // kv_heads; row r's query heads are rows r*g .. r*g+g-1) or None (all keys visible). Every row
    must see at least one key. Returns [b, heads, rows, d]."""
    b, heads, rows, d = q.shape
    kv_heads = keys.shape[1]
    g = heads // kv_heads
    assert heads == g * kv_heads and keys.shape == values.shape and keys.shape[0] == b
    n = keys.shape[2]
    if n < MIN_KEYS:  # masked zero keys, so that every call reduces with the same lanes
        keys, values = (F.pad(t, (0, 0, 0, MIN_KEYS - n)) for t in (keys, values))
        if visible is None:
            visible = torch.ones(b, 1, rows * g, n, dtype=torch.bool, device=q.device)
        visible = F.pad(visible, (0, MIN_KEYS - n), value=False)
    qg = q.view(b, kv_heads, g, rows, d).transpose(2, 3).reshape(b, kv_heads, rows * g, d)  # GQA: g queries a kv head
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale  # [b, kv_heads, rows * g, n]
    if visible is not None:
        scores.masked_fill_(~visible, float("-inf"))
    p = scores.softmax(-1).to(values.dtype)
    out = torch.matmul(p, values)  # [b, kv_heads, rows * g, d]
    return out.view(b, kv_heads, rows, g, d).transpose(2, 3).reshape(b, heads, rows, d)


def chain_visibility(starts: torch.Tensor, q: int, n: int, g: int) -> torch.Tensor:
    """For q chain nodes per row written at columns starts[r] + j (node j sees the cached starts[r]
    entries and nodes 0..j): bool [b, 1, q * g, n], each node's line repeated for its g query heads."""
    cols = torch.arange(n, device=starts.device)
    nodes = torch.arange(q, device=starts.device)
    seen = cols <= (starts[:, None] + nodes)[:, :, None]  # [b, q, n]
    return seen.repeat_interleave(g, dim=1)[:, None]


@functools.lru_cache(maxsize=None)
def batched_rows_are_exact(dtype: torch.dtype, threads: int, kv_heads: int = 3, g: int = 3, d: int = 64) -> bool:
    """Whether one rows_attention call over several sequences' chains gives each row what it gets alone
    on this CPU, checked on random data of the model's attention shape (kv_heads kv heads of g queries,
    head size d; the default model's by default; ~10 ms)."""
    gen = torch.Generator().manual_seed(0)
    b, q = 4, 3
    starts = torch.tensor([5, 40, 9, 700])
    n = int(starts.max()) + q
    keys, values = (torch.randn(b, kv_heads, n, d, generator=gen).to(dtype) for _ in range(2))
    qs = (3 * torch.randn(b, kv_heads * g, q, d, generator=gen)).to(dtype)
    together = rows_attention(qs, keys, values, chain_visibility(starts, q, n, g), 0.125)
    for r in range(b):
        for j in range(q):
            m = int(starts[r]) + j + 1
            alone = rows_attention(qs[r:r + 1, :, j:j + 1], keys[r:r + 1, :, :m], values[r:r + 1, :, :m], None, 0.125)
            if not torch.equal(alone[0, :, 0], together[r, :, j]):
                return False
    return True
