"""A decoder layer's small ops in C++ (csrc/layer_ops.cpp), for the lean forward's few-row float32 passes.

Between its products a layer runs RMSNorm twice, the rotary embedding, attention and SiLU(gate) * up. At
one row each torch call costs far more in dispatch than in arithmetic (2 threads, this project's AMD EPYC:
RMSNorm 15 us, apply_rotary_pos_emb 50 us, SDPA 32 us at one query and 87 at three; docs/verify_profile.md),
about half of a one-token pass once the products read GGUF blocks. Here each is one call.

The attention computes each query row alone, in an order set by its key columns only (padding and masked
columns add exact zeros), and so do the other ops: with row-independent products (few_rows), a tree
node's hidden state is bit for bit what a plain step at its position computes.

Built like few_rows (torch.utils.cpp_extension, -march=native, once per CPU); None where it cannot be,
and the lean forward keeps torch's ops. `DRAFTHEADS_LAYER_OPS=0` (or `ENABLED = False`, which the
comparison scripts switch per run) keeps them too.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch

from . import few_rows

SOURCE = Path(__file__).with_name("csrc") / "layer_ops.cpp"
EMPTY = torch.empty(0)  # "no residual to add" / "no mask" for the C++ calls
ENABLED = os.environ.get("DRAFTHEADS_LAYER_OPS", "1") != "0"  # False: torch's ops everywhere


@cache
def load():
    """The compiled module, or None where it cannot be built (said once)."""
    return few_rows.build(SOURCE, "the C++ layer ops")


def applies(x: torch.Tensor) -> bool:
    """Whether a pass over x [rows, hidden] takes the C++ ops: ENABLED, float32 on a CPU, no gradients (they
    have no backward), the module built."""
    return (ENABLED and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and load() is not None)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: torch.nn.Module) -> torch.Tensor:
    """x [rows, hidden] += delta in place (None: nothing), then the RMSNorm module `norm` of x -> [rows, hidden]."""
    return load().add_rms_norm(x, EMPTY if delta is None else delta, norm.weight, norm.variance_epsilon)


def rope_(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    """Rotate heads [0, heads) of each row of t [rows, >= heads * head_dim] in place; cos, sin [rows, head_dim]."""
    load().rope_(t, cos, sin, heads)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, both [rows, intermediate] (row-strided views allowed) -> [rows, intermediate]."""
    return load().silu_mul(gate, up)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
              scale: float, limits: list[int] | None = None) -> torch.Tensor:
    """q [b, q, heads, d], keys/values [b, kv_heads, keys, d], mask additive [1 or b, 1, q, keys] or None
    -> [b, q, heads * d]: SDPA with enable_gqa, one query row at a time. limits [b] (with a mask): batch row
    r's mask hides every column from limits[r] on, which are then not read (the same floats)."""
    return load().attention(q, keys, values, EMPTY if mask is None else mask, scale, limits or [])
