"""The C++ layer ops (layer_ops.py) compute what torch's ops compute, each row alone: with row-independent
products, a tree node's hidden state is bit for bit what plain steps along its path compute."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from draftheads import cpu_matmul, few_rows, layer_ops
from draftheads.cpu_matmul import MAX_ROWS
from draftheads.generate import Decoder
from draftheads.kvcache import TreeKVCache
from draftheads.tree import load_tree
from tiny import ARCHS, tiny_model

pytestmark = pytest.mark.skipif(few_rows.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")
MIN = torch.finfo(torch.float32).min


class _Norm(torch.nn.Module):
    def __init__(self, width: int, g: torch.Generator):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(width, generator=g) + 0.5, requires_grad=False)
        self.variance_epsilon = 1e-5


def _cos_sin(positions: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary tables for `positions` [rows] -> cos, sin [rows, d] (both halves equal)."""
    angles = positions[:, None].float() / 10000 ** (torch.arange(0, d, 2).float() / d)  # [rows, d / 2]
    emb = torch.cat([angles, angles], -1)
    return emb.cos(), emb.sin()


def test_the_ops_are_built_on_a_cpu_with_avx2():
    assert layer_ops.load() is not None


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_norm_rope_and_silu_equal_torch(rows):
    g = torch.Generator().manual_seed(rows)
    norm = _Norm(72, g)  # 72: a tail past the last whole vector
    x, delta = torch.randn(rows, 72, generator=g), torch.randn(rows, 72, generator=g)
    summed = x.clone()
    y = layer_ops.add_rms_norm(summed, delta, norm)
    assert torch.equal(summed, x + delta)  # added in place
    torch.testing.assert_close(y, F.rms_norm(x + delta, (72,), norm.weight, 1e-5), rtol=1e-6, atol=1e-6)
    unchanged = x.clone()
    torch.testing.assert_close(layer_ops.add_rms_norm(unchanged, None, norm), F.rms_norm(x, (72,), norm.weight, 1e-5))
    assert torch.equal(unchanged, x)

    heads, kv_heads, d = 4, 2, 16
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g)
    cos, sin = _cos_sin(torch.randint(0, 500, (rows,), generator=g), d)
    q = qkv[:, :heads * d].view(1, rows, heads, d).transpose(1, 2)
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(1, rows, kv_heads, d).transpose(1, 2)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    rotated = qkv.clone()
    layer_ops.rope_(rotated, cos, sin, heads + kv_heads)
    torch.testing.assert_close(rotated[:, :heads * d].view(1, rows, heads, d).transpose(1, 2), q_ref)
    torch.testing.assert_close(rotated[:, heads * d:(heads + kv_heads) * d].view(1, rows, kv_heads, d).transpose(1, 2), k_ref)
    assert torch.equal(rotated[:, (heads + kv_heads) * d:], qkv[:, (heads + kv_heads) * d:])  # values untouched

    gate, up = (torch.randn(rows, 2 * 52, generator=g) * 4).chunk(2, -1)  # views of one product's halves
    torch.testing.assert_close(layer_ops.silu_mul(gate, up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 2, 16), (4, 4, 128), (2, 1, 40)])
@pytest.mark.parametrize("q,keys,shared_mask", [(1, 1, False), (1, 37, False), (3, 37, True), (5, 70, False)])
def test_attention_equals_sdpa(heads, kv_heads, d, q, keys, shared_mask):
    g = torch.Generator().manual_seed(heads * d + q)
    b = 2
    queries = torch.randn(b, q, heads, d, generator=g)
    k, v = torch.randn(2, b, kv_heads, keys + 3, d, generator=g)[..., :keys, :]  # views with a longer row stride
    mask = None
    if q > 1:  # the prefix visible, the new rows causal, and in batch row 1 one prefix column hidden
        mask = torch.zeros(1 if shared_mask else b, 1, q, keys)
        mask[..., keys - q:] = torch.full((q, q), MIN).triu(1)
        if not shared_mask:
            mask[1, :, :, 3] = MIN
    ref = F.scaled_dot_product_attention(queries.transpose(1, 2), k, v, attn_mask=mask, scale=d ** -0.5, enable_gqa=True)
    out = layer_ops.attention(queries, k, v, mask, d ** -0.5)  # [b, q, heads * d]
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(b, q, heads * d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q", [1, 3])
def test_attention_over_half_keys_and_values_is_attention_over_their_float32_values(q):
    """A float16 cache: each key and value is converted as it is read (exactly: every half is a float32), and
    the sums are float32 as before, so the result is the same floats as over the converted tensors."""
    b, heads, kv_heads, d, keys = 3, 9, 3, 64, 150
    g = torch.Generator().manual_seed(q)
    queries = torch.randn(b, q, heads, d, generator=g)
    k, v = (t.half() for t in torch.randn(2, b, kv_heads, keys + 5, d, generator=g)[..., :keys, :] * 3)
    mask = torch.where(torch.rand(b, 1, q, keys, generator=g) < 0.3, MIN, 0.0)
    lengths = [150, 61, 97]
    halves = layer_ops.attention(queries, k, v, mask, 0.125, lengths)
    assert halves.dtype == torch.float32
    assert torch.equal(halves, layer_ops.attention(queries, k.float(), v.float(), mask, 0.125, lengths))
    with pytest.raises(RuntimeError, match="both float32 or both float16"):
        layer_ops.attention(queries, k, v.float(), mask, 0.125)


@pytest.mark.parametrize("threads", [1, 2])
def test_attention_computes_each_row_as_it_would_alone(threads):
    """Tasks share a kv head's key and value reads among the queries of a batch row (and split them where
    the batch gives the threads too few): whatever the batch, the rows, the threads and the value blocks
    (150 keys: three), a row's output is the same floats as that row computed alone."""
    b, q, heads, kv_heads, d, keys = 3, 4, 9, 3, 64, 150
    g = torch.Generator().manual_seed(7)
    queries = torch.randn(b, q, heads, d, generator=g)
    k, v = torch.randn(2, b, kv_heads, keys, d, generator=g)
    mask = torch.where(torch.rand(b, 1, q, keys, generator=g) < 0.3, MIN, 0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = layer_ops.attention(queries, k, v, mask, 0.125)  # [b, q, heads * d]
        for r in range(b):
            for i in range(q):
                alone = layer_ops.attention(queries[r:r + 1, i:i + 1], k[r:r + 1], v[r:r + 1], mask[r:r + 1, :, i:i + 1], 0.125)
                assert torch.equal(out[r, i], alone[0, 0]), (r, i)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("q", [1, 3])
def test_attention_reads_no_column_past_a_rows_limit(q):
    """A batch of sequences of different lengths: row b's mask hides every column past its own, so with limits
    attention neither reads them (NaN there stays out of the output) nor changes a float of the result."""
    b, heads, kv_heads, d, keys = 4, 9, 3, 64, 150
    lengths = [150, 7, 64, 93]  # columns each sequence owns, its q new ones included
    g = torch.Generator().manual_seed(q)
    queries = torch.randn(b, q, heads, d, generator=g)
    k, v = torch.randn(2, b, kv_heads, keys, d, generator=g)
    mask = torch.zeros(b, 1, q, keys)
    for r, n in enumerate(lengths):
        mask[r, :, :, n - q:n] = torch.full((q, q), MIN).triu(1)
        mask[r, :, :, n:] = MIN
    full = layer_ops.attention(queries, k, v, mask, 0.125)  # [b, q, heads * d]
    for r, n in enumerate(lengths):
        k[r, :, n:], v[r, :, n:] = float("nan"), float("nan")  # what a slot holds past its length is never read
    limited = layer_ops.attention(queries, k, v, mask, 0.125, lengths)
    assert torch.equal(limited, full)
    assert layer_ops.attention(queries, k, v, mask, 0.125).isnan().any()  # without limits the NaN columns are read


@pytest.mark.parametrize("prefix", [29, 32])
def test_attention_gives_a_tree_node_what_a_plain_step_over_its_path_computes(prefix):
    """A branching tree's node sees its ancestors at their own columns with masked siblings between; a plain
    step sees the same keys side by side. The results are the same floats."""
    parents = (-1, 0, 0, 1, 2, 3, 1)
    n, heads, kv_heads, d = len(parents), 9, 3, 64
    g = torch.Generator().manual_seed(prefix)
    queries = torch.randn(1, n, heads, d, generator=g)
    k, v = torch.randn(2, 1, kv_heads, prefix + n, d, generator=g)
    mask = torch.full((1, 1, n, prefix + n), MIN)
    mask[..., :prefix] = 0
    for node in range(n):
        a = node
        while a >= 0:
            mask[0, 0, node, prefix + a] = 0
            a = parents[a]
    tree = layer_ops.attention(queries, k, v, mask, 0.125)  # [1, n, heads * d]
    for node in range(n):
        path, a = [], node
        while a >= 0:
            path.insert(0, a)
            a = parents[a]
        cols = list(range(prefix)) + [prefix + p for p in path]
        plain = layer_ops.attention(queries[:, node:node + 1], k[:, :, cols], v[:, :, cols], None, 0.125)
        assert torch.equal(tree[0, node], plain[0, 0]), node


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lean_forward_with_the_ops_equals_it_with_torchs(arch, kv_dtype, monkeypatch):
    model = tiny_model(arch)
    decoder = Decoder(model)
    prompt = torch.randint(0, 200, (20,), generator=torch.Generator().manual_seed(0))
    tt = load_tree("medusa16", 3).tensors("cpu", torch.float32)
    cands = torch.randint(0, 200, (tt.depths.numel(),), generator=torch.Generator().manual_seed(1))
    causal = torch.full((20, 20), MIN).triu(1)
    calls, attention = [], layer_ops.attention
    monkeypatch.setattr(layer_ops, "attention", lambda *a: calls.append(1) or attention(*a))
    outputs = {}
    for ops in (True, False):
        monkeypatch.setattr(layer_ops, "ENABLED", ops)
        cache = TreeKVCache.for_model(model, 64, kv_dtype)
        with torch.inference_mode():
            prefill = decoder.engine._forward(cache, prompt, torch.arange(20), causal)
            tree = decoder.engine._forward(cache, cands, tt.depths + 20, tt.tree_bias)
            outputs[ops] = [prefill, tree, cache.kv[:, :, :, :, :20 + cands.numel()].clone()]
        assert bool(calls) == ops
        calls.clear()
    # In float16 a key that the two orders of summation leave on either side of a half's rounding boundary moves by
    # a half's step (2^-11 of it), and the rows that attend to it a little less
    tol = 1e-5 if kv_dtype == torch.float32 else 1e-3
    for with_ops, without in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(with_ops.float(), without.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tree_rows_equal_plain_steps_bit_for_bit(arch, monkeypatch):
    """With the C++ kernel for every product (row-independent) and the ops, each node of a branching tree
    gets exactly the hidden state plain decoding computes at it: greedy speculation cannot differ."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {threads: dict.fromkeys(range(1, MAX_ROWS + 1), "rows")})
    monkeypatch.setattr(cpu_matmul, "_PACKED_ROWS", {threads: 0})
    model = tiny_model(arch)
    decoder = Decoder(model)
    tree = load_tree("medusa16", 3)
    tt = tree.tensors("cpu", torch.float32)
    prompt = torch.randint(0, 200, (13,), generator=torch.Generator().manual_seed(2))
    cands = torch.randint(0, 200, (tree.size,), generator=torch.Generator().manual_seed(3))
    causal = torch.full((13, 13), MIN).triu(1)

    def prefilled() -> TreeKVCache:
        cache = TreeKVCache.for_model(model, 64)
        decoder.engine._forward(cache, prompt, torch.arange(13), causal)
        return cache

    with torch.inference_mode():
        verified = decoder.engine._forward(prefilled(), cands, tt.depths + 13, tt.tree_bias)  # [nodes, hidden]
        for leaf in set(range(tree.size)) - set(tree.parent):
            cache, path = prefilled(), tree.path_to(leaf)
            for depth, node in enumerate(path):
                step = decoder.engine._forward(cache, cands[node:node + 1], torch.tensor([13 + depth]), tt.tree_bias[:1, :1])
                assert torch.equal(step[0], verified[node]), (leaf, node)
