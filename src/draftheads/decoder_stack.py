"""The lean forward's few-row float32 pass as one C++ call (csrc/decoder_stack.cpp) where every product's
weight is GGUF blocks (the default model's).

At one row the lean forward made ~25 Python-level calls a layer between and around its C++ kernels
(cpu_matmul's routing, few_rows' packed-weight lookup, the cache's append, views), ~70 us a layer: ~2 ms of
a ~13 ms pass on this project's 2-core AMD EPYC (docs/verify_profile.md). The C++ stack calls the same
kernels and ops (few_rows.cpp, layer_ops.cpp) in the same order, so its floats are the lean forward's,
bit for bit (tests/test_decoder_stack.py).

It applies where the per-op path would run every product on the packed kernel (cpu_matmul.linear's rule:
float32 CPU, the rows within packed_rows(), weights that pack) with the C++ layer ops, for one sequence
whose cache hands every layer's write place at once (kvcache's `write_views`). `DRAFTHEADS_DECODER_STACK=0`
(or `ENABLED = False`, which scripts/profile_verify.py switches per run) keeps the per-op path.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch

from . import few_rows
from .cpu_matmul import packed_rows

SOURCE = Path(__file__).with_name("csrc") / "decoder_stack.cpp"
_NO_TENSOR = torch.empty(0)  # no bias / Q8_0's offsets
ENABLED = os.environ.get("DRAFTHEADS_DECODER_STACK", "1") != "0"


@cache
def load():
    """The compiled module, or None where it cannot be built (said once)."""
    return few_rows.build(SOURCE, "the C++ decoder stack")


def build(fwd, fused: list) -> object | None:
    """A csrc DecoderStack over fwd's (a LlamaForward) layers with their fused q/k/v and gate/up weights
    `fused` (per layer ((w, b), (w, b))), or None where some product's weight does not pack or the module
    did not build."""
    if load() is None:
        return None
    layers, outs, eps = [], [], []
    for layer, (qkv, gate_up) in zip(fwd.layers, fused):
        at, mlp = layer.self_attn, layer.mlp
        tensors, counts = [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()], []
        for w, b in (qkv, (at.o_proj.weight, at.o_proj.bias), gate_up, (mlp.down_proj.weight, mlp.down_proj.bias)):
            p = few_rows.packed(w) if w.is_contiguous() else None
            if p is None:
                return None
            tensors += [p.q, p.d, p.m if p.m is not None else _NO_TENSOR, b.detach() if b is not None else _NO_TENSOR]
            counts.append(p.out)
        layers.append(tensors)
        outs.append(counts)
        eps.append([layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon])
    return load().DecoderStack(layers, outs, eps, fwd.norm.weight.detach(), fwd.norm.variance_epsilon, fwd.heads,
                               fwd.kv_heads, fwd.head_dim, fwd.scaling)


def applies(rows: int) -> bool:
    """Whether a pass of `rows` rows runs every packed product on the packed kernel (cpu_matmul.linear)."""
    return ENABLED and rows <= packed_rows() and not torch.is_grad_enabled()
