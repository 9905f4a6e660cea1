"""Few-row linear layers on CPU, routed to the kernel that streams the weights fastest.

A decode step multiplies 1 to ~32 rows by every weight matrix, and on CPU that is bound by reading
the weights. `F.linear(x, W)` (x @ W.T) takes MKL's GEMV for one row and a GEMM that costs 1.3-1.7x
more for 2-16 rows; the same product written as `(W @ x.T).T` streams W faster: measured over 30
layers of SmolLM2-135M-shaped fp32 weights on 2 cores, 1 row 34 ms, 2 rows 45 ms -> 25 ms,
4 rows 55 -> 24 ms, 16 rows 59 -> 48 ms (scripts/bench_linear.py; docs/verify_profile.md). Results differ from F.linear only
by float rounding order.

`few_row_linear()` is a torch function mode; the decoding loop enters it around forwards of 2+ rows
(tree verification), so the model itself is untouched, the prefill and one-token steps run the stock
kernels (plain decoding uses the same matmul kernels as transformers'), and other users of the model
see stock kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MAX_ROWS = 32  # above this the GEMM is compute-bound and F.linear's layout is as good


class _FewRowLinear(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // x.shape[-1]
            if 1 < rows <= MAX_ROWS and x.device.type == "cpu" and w.dtype == x.dtype == torch.float32:
                y = (w @ x.reshape(rows, x.shape[-1]).T).T  # [rows, out]
                if b is not None:
                    y = y + b
                return y.reshape(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)


def few_row_linear(device: torch.device) -> TorchFunctionMode | None:
    """The mode for `device` (CPU only), or None where stock kernels are used."""
    return _FewRowLinear() if torch.device(device).type == "cpu" else None
