"""Few-row linear layers on CPU, routed to the kernel that streams the weights fastest.

A decode step multiplies 1 to ~32 rows by every weight matrix, and on CPU that is bound by reading
the weights. `F.linear(x, W)` (x @ W.T) takes MKL's GEMV for one row, which streams the weights on
one thread (same time with 1 and 2 threads), and for 2-16 rows a GEMM that costs 1.3-1.7x more. The
same product written as `(W @ x.T).T`, with the rows padded to a power of two, streams W on every
thread. Measured over 30 layers of SmolLM2-135M-shaped fp32 weights on 2 cores
(scripts/bench_linear.py; docs/verify_profile.md): 1 row 34 -> 25 ms, 2 rows 45 -> 24 ms,
4 rows 55 -> 24 ms, 16 rows 59 -> 47 ms. Results differ from F.linear only by float rounding order.

`linear()` is the routing rule. The Llama-family forward (llama_forward.py) calls it directly;
for other models `few_row_linear()` is a torch function mode that routes their `F.linear` calls to
it, entered by the decoding loop around its own forwards of 2+ rows only, because the mode's per-op
Python dispatch costs about what the one-row kernel saves. The model object itself is never changed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MAX_ROWS = 32  # above this the GEMM is compute-bound and F.linear's layout is as good


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b) with few-row CPU fp32 products routed to `(w @ x.T).T`. x [..., in] -> [..., out]."""
    rows = x.numel() // x.shape[-1]
    if torch.compiler.is_compiling():
        return F.linear(x, w, b)  # Inductor picks its own GEMM for a plain linear
    if not (rows <= MAX_ROWS and x.device.type == "cpu" and w.dtype == x.dtype == torch.float32):
        return F.linear(x, w, b)
    if rows == 1 and torch.get_num_threads() == 1:
        return F.linear(x, w, b)  # on one thread the GEMV beats a two-row GEMM doing twice the work
    # MKL's few-column GEMM is fast for 2, 4, 16 and 32 columns and up to 2x slower in between
    # (30 layers, 2 threads: 3 rows 31 ms vs 4 rows 24 ms; 15 rows 107 ms vs 16 rows 47 ms), so pad
    # with zero rows to the next power of two; one row becomes two, which uses both cores where
    # MKL's GEMV streams the weights on one (36 vs 25 ms).
    padded = max(2, 1 << (rows - 1).bit_length())
    x2 = x.reshape(rows, x.shape[-1])
    if padded > rows:
        x2 = torch.cat((x2, x2.new_zeros(padded - rows, x2.shape[1])))
    # Row-major like F.linear's output: attention's fast kernels need unit stride in the last dim.
    y = (w @ x2.T)[:, :rows].T.contiguous()  # [rows, out]
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], w.shape[0])


class _FewRowLinear(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
        return func(*args, **kwargs)


def few_row_linear(device: torch.device) -> TorchFunctionMode | None:
    """The mode for `device` (CPU only), or None where stock kernels are used."""
    return _FewRowLinear() if torch.device(device).type == "cpu" else None
