"""Few-row linear layers on CPU, routed to the kernel that streams the weights fastest.

A decode step multiplies 1 to ~32 rows by every weight matrix, and on CPU that is bound by reading
the weights. `F.linear(x, W)` (x @ W.T) takes MKL's GEMV for one row, which streams the weights on
one thread (same time with 1 and 2 threads), and for 2-16 rows a GEMM that costs 1.3-1.7x more. The
same product written as `(W @ x.T).T`, with the rows padded to a power of two, streams W on every
thread. Measured over 30 layers of SmolLM2-135M-shaped fp32 weights on 2 cores
(scripts/bench_linear.py; docs/verify_profile.md): 1 row 34 -> 25 ms, 2 rows 45 -> 24 ms,
4 rows 55 -> 24 ms, 16 rows 59 -> 47 ms. Results differ from F.linear only by float rounding order.

A third kernel, few_rows.py (C++, AVX2, compiled on first use), reads each weight row once for up to 8
rows of x and beat both on another AVX2 AMD EPYC (2026-12-05): 1 row 14.5 ms, 8 rows 22.6 ms, where the
padded product took 25.7 and 40.3.

Which kernel streams faster depends on the CPU and its BLAS: on an Intel Xeon (AVX-512, 2 threads)
MKL's F.linear beat the padded product at every row count up to 12 (1 row 14.9 vs 37.7 ms over 30
layers), the opposite of the AMD EPYC figures above. So the rule is measured, not assumed: on first
use per (CPU model, torch version, thread count, C++ build) `routes()` times the kernels at 1-32 rows on
SmolLM2-shaped weights (~2.5 s; the packed kernel ~4.7 s more, below) and caches, per row count, the
kernel that beats F.linear by 5% or more in `$DRAFTHEADS_CACHE/cpu_matmul.json`. `DRAFTHEADS_FEW_ROW_KERNEL=padded|rows|stock` forces one kernel.

Where a weight is exactly the values of GGUF Q4_1 or Q8_0 blocks (the default model's are: it is a
dequantised GGUF file), `few_rows.packed_linear` multiplies by the blocks instead, 4-6x fewer bytes (1 row
over 30 layers 14.4 -> 8.6 ms, ~5.4 since). Its rounding is not the other kernels', so it is taken at every
row count up to `packed_rows()` or at none: measured with the routes and cached beside them (1 to MAX_ROWS
rows, and prefills up to 64 or 128 rows where it beats MKL there too; `DRAFTHEADS_FEW_ROW_KERNEL=packed`
forces it to MAX_ROWS).

`linear()` is the routing rule. The Llama-family forward (llama_forward.py) calls it directly;
for other models `few_row_linear()` is a torch function mode that routes their `F.linear` calls to
it, entered by the decoding loop around its own forwards of 2+ rows only, because the mode's per-op
Python dispatch costs about what the one-row kernel saves. The model object itself is never changed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import few_rows

MAX_ROWS = 32  # above this the GEMM is compute-bound and F.linear's layout is as good
GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # row counts timed; others take the next one up
KERNELS = ("padded", "rows")  # besides F.linear ("stock"): padded_linear and few_rows.linear
_ROUTES: dict[int, dict[int, str]] = {}  # threads -> {row count: the kernel that beats F.linear there}
# threads -> the most rows of a product that take few_rows.packed_linear where the weight is GGUF blocks (0: none)
_PACKED_ROWS: dict[int, int] = {}
# Past MAX_ROWS (a prefill) the packed kernel still reads 6x fewer bytes and its groups of 6 rows run near the
# FMA peak, where MKL's GEMM on the float32 weights does not: 30 layers at 64 rows 137 -> 94 ms, 128 rows 228 ->
# 187 (AVX2 EPYC, 2 threads). Row counts measured there:
PREFILL_GRID = (64, 128)
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # SmolLM2-135M's q k v o gate up down
ROW_EXACT_DTYPES = (torch.bfloat16, torch.float16)  # one-row products padded to two: see two_rows
ROW_EXACT_CHUNK = 32  # and products of more rows run this many at a time: see chunked_rows


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b) with few-row CPU fp32 products routed to the kernel `routes()` measured fastest
    for their row count, and one-row CPU bf16/fp16 products run as two rows (`two_rows`). x [..., in] -> [..., out]."""
    # ~120 calls a pass of the default model, so the common case asks as little as it can (x.is_cpu, not
    # x.device.type; the routing table directly once measured)
    rows = x.numel() // x.shape[-1]
    if torch.compiler.is_compiling():
        return F.linear(x, w, b)  # Inductor picks its own GEMM for a plain linear
    if x.is_cpu and x.dtype in ROW_EXACT_DTYPES and (rows == 1 or rows > ROW_EXACT_CHUNK):
        return two_rows(x, w, b) if rows == 1 else chunked_rows(x, w, b)
    if not (x.is_cpu and w.dtype == x.dtype == torch.float32):
        return F.linear(x, w, b)
    threads = torch.get_num_threads()
    table = _ROUTES.get(threads)
    table = table if table is not None else routes()
    if rows <= _PACKED_ROWS.get(threads, 0) and w.is_contiguous() and not _needs_grad(x, w, b):
        # From the weights' GGUF blocks where they hold them exactly (the default model's do): 4-6x fewer bytes.
        # At every row count up to packed_rows(), so that a row's result never depends on the pass it is in.
        p = few_rows.packed(w)
        if p is not None:
            return few_rows.packed_linear(x, p, b)
    if rows > MAX_ROWS:
        return F.linear(x, w, b)
    kernel = table.get(rows)
    if kernel == "rows" and w.is_contiguous() and not _needs_grad(x, w, b):  # the C++ kernel has no backward
        return few_rows.linear(x, w, b)
    if kernel == "padded":
        return padded_linear(x, w, b)
    return F.linear(x, w, b)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def two_rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear of one row [..., in] as the first row of a two-row product -> [..., out].

    oneDNN's bf16 product takes another kernel for one row than for two or more, which rounds
    differently (the default model's down_proj: 2-9 of 40 real rows differ in some element), while 2
    to 40 rows give each row bitwise what it gets alone in a two-row product (scripts/bf16_exactness.py).
    A plain step's rows then equal the same rows of a tree pass, which bf16's 8-bit mantissa needs
    for speculative output to equal plain output. It is also faster: the two-row kernel streams the
    weights on every thread."""
    x2 = x.reshape(1, x.shape[-1])
    y = F.linear(torch.cat((x2, x2.new_zeros(1, x2.shape[1]))), w, b)[:1]
    return y.reshape(*x.shape[:-1], w.shape[0])


def chunked_rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear of many rows [..., in] as products of ROW_EXACT_CHUNK rows at a time -> [..., out].

    On a CPU with AMX (Sapphire Rapids class, stop 48) oneDNN's bf16 product switches to another kernel past 32
    rows, which rounds differently from the 2-32-row one (every shape measured, from SmolLM2's to a 7B's; fp16
    kept its kernel): a tree or batched pass of 33+ rows would then give rows other than plain steps do. Chunks
    of 32 keep every row as its two-row product gives it."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.cat([F.linear(c, w, b) for c in x2.split(ROW_EXACT_CHUNK)])
    return y.reshape(*x.shape[:-1], w.shape[0])


def padded_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`(w @ x.T).T` with the rows zero-padded to a power of two. x [..., in] -> [..., out]."""
    rows = x.numel() // x.shape[-1]
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


def routes() -> dict[int, str]:
    """{row count (1..MAX_ROWS): the kernel of KERNELS that beats F.linear there on this machine}."""
    threads = torch.get_num_threads()
    if threads not in _ROUTES:
        forced = os.environ.get("DRAFTHEADS_FEW_ROW_KERNEL", "auto")
        packed = 0
        if forced == "packed" and _usable("rows"):
            table, packed = dict.fromkeys(range(1, MAX_ROWS + 1), "rows"), MAX_ROWS
        elif forced in KERNELS and _usable(forced):
            table = dict.fromkeys(range(1, MAX_ROWS + 1), forced)
        elif forced == "stock":
            table = {}
        else:
            table, packed = _cached_or_measured(threads)
        _ROUTES[threads], _PACKED_ROWS[threads] = table, packed
    return _ROUTES[threads]


def forget_routes() -> None:
    """Drop the routes and packed-row limits of this process, so that the next product reads (or measures) them
    for the kernels now in use (few_rows.set_activations)."""
    _ROUTES.clear()
    _PACKED_ROWS.clear()


def packed_rows() -> int:
    """The most rows of a product that take few_rows.packed_linear where its weight is GGUF blocks (0: none;
    measured with routes(): MAX_ROWS or more where it beats the routed kernels by 5% over their row counts)."""
    routes()
    return _PACKED_ROWS.get(torch.get_num_threads(), 0)


def _usable(kernel: str) -> bool:
    """The padded product always; the C++ kernel where it built."""
    return kernel == "padded" or (kernel == "rows" and few_rows.load() is not None)


def _cached_or_measured(threads: int) -> tuple[dict[int, str], int]:
    from .backbone import cache_dir  # the converted model's cache, one place for both

    model = few_rows.cpu_info()[0] or platform.processor() or platform.machine()
    # The C++ build's name carries a hash of its sources: a changed kernel is measured again (stop 46's per-block
    # scaling made 64 rows 8% slower, which the cached prefill limit had not seen)
    build = getattr(few_rows.load(), "__name__", "no C++ kernel")
    key = (f"{model} | torch {torch.__version__} | {threads} threads | kernels {', '.join(KERNELS)}, packed rows {PREFILL_GRID}"
           f" | {build} | {few_rows.activations()} activations")
    path = cache_dir() / "cpu_matmul.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        if sys.stderr.isatty():  # a first run on this CPU, thread count or kernel build waits for it: say why
            print(f"draftheads: timing this CPU's matmul kernels at {threads} thread(s), once (5-40 s; cached in {path})",
                  file=sys.stderr, flush=True)
        routed = measure(threads)
        table[key] = {"routes": {str(r): k for r, k in sorted(routed.items())}, "packed_rows": measure_packed(threads, routed)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(table, indent=1) + "\n")
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: measure again next time
    return {int(r): k for r, k in table[key]["routes"].items()}, int(table[key]["packed_rows"])


@torch.inference_mode()
def measure(threads: int, layers: int = 12, repeats: int = 3, kernels: tuple[str, ...] = KERNELS) -> dict[int, str]:
    """Time F.linear against `kernels` (the padded product; the C++ kernel where it builds) on `layers`
    layers of SmolLM2-135M-shaped fp32 weights (larger than the CPU's caches, as real weights are), at each
    GRID row count; returns {row count 1..MAX_ROWS: the fastest kernel} where it beat F.linear at its grid
    point by 5%."""
    weights = [torch.randn(o, i) for _ in range(layers) for o, i in SHAPES]
    assert set(kernels) <= set(KERNELS), kernels
    kernels = {k: fn for k, fn in (("padded", padded_linear), ("rows", few_rows.linear)) if k in kernels and _usable(k)}

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        wins = {}
        for g in GRID:
            stock = _ms(g, F.linear, weights, repeats)
            best, t = min(((k, _ms(g, fn, weights, repeats)) for k, fn in kernels.items()), key=lambda kt: kt[1])
            if t < 0.95 * stock:
                wins[g] = best
    finally:
        torch.set_num_threads(before)
    return {r: wins[g] for r in range(1, MAX_ROWS + 1) if (g := min(g for g in GRID if g >= r)) in wins}


@torch.inference_mode()
def measure_packed(threads: int, table: dict[int, str], layers: int = 30, repeats: int = 3) -> int:
    """The most rows few_rows.packed_linear should take (0: none). On weights held as Q4_1 blocks, summed over
    the GRID row counts, it must beat what `table` routes them to (F.linear where it names no kernel) by 5%
    (over 30 layers, not `measure`'s 12: 12 layers' blocks, 26 MB, would sit in this EPYC's 32 MB L3, where
    the whole model's 66 MB do not); then it takes MAX_ROWS rows, and each PREFILL_GRID count in turn where it
    beats F.linear by 5% (12 layers: compute-bound there)."""
    if few_rows.load() is None:
        return 0
    g = torch.Generator().manual_seed(0)
    weights = [few_rows.q4_1_values(o, i, g) for _ in range(layers) for o, i in SHAPES]
    packs = {id(w): few_rows.pack(w) for w in weights}
    assert all(p is not None for p in packs.values())
    packed = lambda x, w: few_rows.packed_linear(x, packs[id(w)])  # noqa: E731
    routed = {"rows": few_rows.linear, "padded": padded_linear}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, theirs = (sum(t) for t in zip(*[[_ms(r, fn, weights, repeats) for fn in (packed, routed.get(table.get(r), F.linear))]
                                              for r in GRID]))
        if ours >= 0.95 * theirs:
            return 0
        most, weights = MAX_ROWS, weights[:12 * len(SHAPES)]
        for rows in PREFILL_GRID:
            # medians of 3: with 2, one slow pass of the packed kernel once cut the limit to 32 rows (stop 46)
            if _ms(rows, packed, weights, 3) >= 0.95 * _ms(rows, F.linear, weights, 3):
                break
            most = rows
    finally:
        torch.set_num_threads(before)
    return most


def _ms(rows: int, fn, weights: list[torch.Tensor], repeats: int) -> float:
    """Median seconds of `repeats` passes of fn(x, w) over `weights`, x [rows, in], after one warm-up pass."""
    xs = {i: torch.randn(rows, i) for i in {w.shape[1] for w in weights}}
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        for w in weights:
            fn(xs[w.shape[1]], w)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


class _FewRowLinear(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
        return func(*args, **kwargs)


def few_row_linear(device: torch.device) -> TorchFunctionMode | None:
    """The mode for `device` (CPU only), or None where stock kernels are used."""
    return _FewRowLinear() if torch.device(device).type == "cpu" else None
