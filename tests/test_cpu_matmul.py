"""cpu_matmul's few-row linear equals F.linear up to float rounding, for every shape the loop uses."""

import types

import pytest
import torch
import torch.nn.functional as F

from draftheads import few_rows
from draftheads.cpu_matmul import MAX_ROWS, few_row_linear, linear


@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (1, 7, 24), (MAX_ROWS, 24), (MAX_ROWS + 5, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_stock_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    ref = F.linear(x, w, b)
    with few_row_linear("cpu"):
        out = F.linear(x, w, b)
        via_module = torch.nn.Linear(24, 40, bias=bias)
        via_module.weight.data, via_module.bias = w, (torch.nn.Parameter(b) if bias else None)
        out_module = via_module(x)
    assert out.shape == ref.shape == out_module.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_module, ref, rtol=1e-5, atol=1e-5)


def test_not_used_off_cpu():
    assert few_row_linear("meta") is None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 3])
def test_linear_equals_f_linear(rows, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the one-row kernel depends on the thread count
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(rows, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x[0], w), F.linear(x[0], w), rtol=1e-5, atol=1e-5)  # a 1-d input
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, MAX_ROWS])
def test_padded_product_equals_f_linear(rows):
    from draftheads.cpu_matmul import padded_linear

    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(rows, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    out = padded_linear(x, w, b)
    assert out.is_contiguous()  # row-major: attention's fast kernels need it
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_routes_are_measured_per_machine_and_can_be_forced(tmp_path, monkeypatch):
    from draftheads import cpu_matmul

    monkeypatch.setenv("DRAFTHEADS_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    calls = []
    monkeypatch.setattr(cpu_matmul, "measure", lambda threads: calls.append(threads) or {2: "padded", 3: "rows"})
    monkeypatch.setattr(cpu_matmul, "measure_packed", lambda threads, table: calls.append("packed") or 64)
    assert cpu_matmul.routes() == {2: "padded", 3: "rows"} and calls == [torch.get_num_threads(), "packed"]
    assert cpu_matmul.packed_rows() == 64
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setattr(cpu_matmul, "_PACKED_ROWS", {})
    assert cpu_matmul.routes() == {2: "padded", 3: "rows"} and len(calls) == 2  # the second process reads the cached table
    assert cpu_matmul.packed_rows() == 64
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setenv("DRAFTHEADS_FEW_ROW_KERNEL", "stock")
    assert cpu_matmul.routes() == {}
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setenv("DRAFTHEADS_FEW_ROW_KERNEL", "padded")
    assert cpu_matmul.routes() == dict.fromkeys(range(1, MAX_ROWS + 1), "padded")
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setenv("DRAFTHEADS_FEW_ROW_KERNEL", "rows")
    monkeypatch.setattr(few_rows, "load", lambda: object())
    assert cpu_matmul.routes() == dict.fromkeys(range(1, MAX_ROWS + 1), "rows") and cpu_matmul.packed_rows() == 0
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setenv("DRAFTHEADS_FEW_ROW_KERNEL", "packed")
    assert cpu_matmul.routes() == dict.fromkeys(range(1, MAX_ROWS + 1), "rows") and cpu_matmul.packed_rows() == MAX_ROWS
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setattr(few_rows, "load", lambda: None)  # forced but not built: the measured table instead,
    # measured anew (a machine without the C++ kernel has its own entry)
    assert cpu_matmul.routes() == {2: "padded", 3: "rows"} and len(calls) == 4
    monkeypatch.delenv("DRAFTHEADS_FEW_ROW_KERNEL")
    rebuilt = types.SimpleNamespace(__name__="draftheads_few_rows_0123456789abcdef")
    for measured in (6, 6):  # another build of the kernel is measured once, then read from the cache
        monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
        monkeypatch.setattr(few_rows, "load", lambda: rebuilt)
        assert cpu_matmul.routes() == {2: "padded", 3: "rows"} and len(calls) == measured


def test_measure_returns_row_counts_in_range():
    from draftheads.cpu_matmul import KERNELS, measure

    wins = measure(1, layers=1, repeats=1)
    assert set(wins) <= set(range(1, MAX_ROWS + 1)) and set(wins.values()) <= set(KERNELS)


def test_each_route_runs_its_kernel(monkeypatch):
    from draftheads import cpu_matmul

    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 24, generator=g), torch.randn(40, 24, generator=g)
    ran = []
    monkeypatch.setattr(cpu_matmul, "padded_linear", lambda *a: ran.append("padded") or F.linear(*a))
    monkeypatch.setattr(few_rows, "linear", lambda *a: ran.append("rows") or F.linear(*a))
    for route, expect in [({3: "padded"}, ["padded"]), ({3: "rows"}, ["rows"]), ({}, []), ({2: "rows"}, [])]:
        ran.clear()
        monkeypatch.setattr(cpu_matmul, "_ROUTES", {torch.get_num_threads(): route})
        cpu_matmul.linear(x, w)
        assert ran == expect, route
    ran.clear()
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {torch.get_num_threads(): {3: "rows"}})
    w_t = torch.randn(24, 40, generator=g).T  # [40, 24], not contiguous: never reaches the C++ kernel
    torch.testing.assert_close(cpu_matmul.linear(x, w_t), F.linear(x, w_t))
    assert ran == []


def test_products_that_need_gradients_keep_them(monkeypatch):
    """Heads train through cpu_matmul.linear: a route to the C++ kernel (no backward) must not cut the graph."""
    from draftheads import cpu_matmul

    monkeypatch.setattr(cpu_matmul, "_ROUTES", {torch.get_num_threads(): {3: "rows"}})
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 24, generator=g), torch.randn(40, 24, generator=g, requires_grad=True)
    cpu_matmul.linear(x, w).sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(40, 24))


needs_kernel = pytest.mark.skipif(few_rows.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 17, MAX_ROWS])
@pytest.mark.parametrize("width", [24, 27])  # 27: a tail past the last 8 floats
def test_few_rows_kernel_equals_f_linear(rows, width):
    assert few_rows.load() is not None, "the C++ kernel did not build on a CPU with AVX2 and FMA"
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, width, generator=g), torch.randn(300, width, generator=g), torch.randn(300, generator=g)
    torch.testing.assert_close(few_rows.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(few_rows.linear(x[None], w), F.linear(x[None], w), rtol=1e-5, atol=1e-5)  # [1, rows, in]


@needs_kernel
def test_few_rows_kernel_gives_each_row_what_it_gets_alone():
    """A row's product does not depend on the rows beside it nor on the thread count, bit for bit (what
    MKL's GEMM does not promise: it picks kernels by row count)."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(MAX_ROWS, 64, generator=g), torch.randn(500, 64, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = few_rows.linear(x, w)
        torch.set_num_threads(1)
        for r in (0, 5, 8, 13, MAX_ROWS - 1):
            assert torch.equal(few_rows.linear(x[r:r + 1], w), together[r:r + 1]), r
            assert torch.equal(few_rows.linear(x[r:r + 3], w), together[r:r + 3]), r
    finally:
        torch.set_num_threads(before)


def test_few_rows_kernel_absent_leaves_the_other_kernels(monkeypatch, caplog):
    from torch.utils import cpp_extension

    from draftheads import cpu_matmul

    monkeypatch.setattr(few_rows, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: (_ for _ in ()).throw(RuntimeError("Error building extension")))
    few_rows.load.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert few_rows.load() is None
        assert "its build failed (Error building extension)" in caplog.text
        assert set(cpu_matmul.measure(1, layers=1, repeats=1).values()) <= {"padded"}
    finally:
        few_rows.load.cache_clear()
    monkeypatch.setattr(few_rows, "unavailable_reason", lambda: "this CPU lacks AVX2 or FMA")
    try:
        assert few_rows.load() is None
    finally:
        few_rows.load.cache_clear()


@needs_kernel
@pytest.mark.parametrize("packed_at, expect", [
    ({}, 128),  # packed 2x faster everywhere: up to the last prefill count
    ({128: 0.96}, 64),  # at 128 within 5% of MKL: stops at 64
    ({64: 0.96}, MAX_ROWS),  # not even at 64: the few-row counts only
    ({r: 0.96 for r in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)}, 0),  # within 5% of the routes summed: none
])
def test_measure_packed_takes_the_row_counts_where_it_wins(monkeypatch, packed_at, expect):
    """measure_packed's rule, on timings given: beat the routed kernels by 5% summed over GRID, then each
    PREFILL_GRID count in turn against F.linear by 5%."""
    from draftheads import cpu_matmul

    def fake_ms(rows, fn, weights, repeats):  # F.linear and the routed kernels 1 ms a row; packed as given
        ours = fn not in (F.linear, few_rows.linear, cpu_matmul.padded_linear)
        return rows * (packed_at.get(rows, 0.5) if ours else 1.0)

    monkeypatch.setattr(cpu_matmul, "_ms", fake_ms)
    table = dict.fromkeys(range(1, 17), "rows") | dict.fromkeys(range(17, MAX_ROWS + 1), "padded")
    assert cpu_matmul.measure_packed(1, table, layers=1) == expect


def _q8_0_values(out: int, width: int, g: torch.Generator) -> torch.Tensor:
    d = (torch.rand(out, width // 32, 1, generator=g) * 0.01).half().float()
    q = torch.randint(-127, 128, (out, width // 32, 32), generator=g)
    q[..., 0] = 127  # a block's largest magnitude is 127 d
    return (d * q).reshape(out, width)


def test_pack_holds_gguf_block_values_exactly_and_nothing_else():
    g = torch.Generator().manual_seed(5)
    w4, w8 = few_rows.q4_1_values(40, 96, g), _q8_0_values(40, 96, g)
    p4, p8 = few_rows.pack(w4), few_rows.pack(w8)
    assert p4.kind == "q4_1" and p4.q.shape == (3, 96, 8) and p4.q.dtype == torch.uint8  # 40 outputs: 3 tiles of 16
    assert p8.kind == "q8_0" and p8.q.shape == (3, 96, 16) and p8.q.dtype == torch.int8

    def rows(t: torch.Tensor) -> torch.Tensor:  # [tiles, n, 16] -> [48, n]: a tile's outputs back to rows
        return t.transpose(1, 2).reshape(48, -1)

    def per_input(t: torch.Tensor) -> torch.Tensor:  # a block's scale for each of its 32 inputs
        return rows(t).repeat_interleave(32, dim=1)

    # each 8 inputs: 16 little-endian uint32 (one an output), nibble s holding input 8 g + s
    b = p4.q.reshape(3, 12, 16, 4).long()  # [tiles, in / 8, outputs, bytes]
    words = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24  # [tiles, in / 8, 16]
    values = torch.stack([(words >> 4 * s) & 15 for s in range(8)], 2).reshape(3, 96, 16).float()  # [tiles, in, 16]
    assert torch.equal((rows(values) * per_input(p4.d) + per_input(p4.m))[:40], w4)
    # each 4 inputs: 16 4-byte words (one an output), byte s holding input 4 g + s
    values8 = p8.q.reshape(3, 24, 16, 4).transpose(2, 3).reshape(3, 96, 16).float()  # [tiles, in, 16]
    assert torch.equal((rows(values8) * per_input(p8.d))[:40], w8)
    assert not rows(values)[40:].any()  # padding rows are zeros
    assert few_rows.pack(torch.randn(40, 96, generator=g)) is None  # ordinary float32 weights
    w_off = w4.clone()
    w_off[7, 50] = torch.nextafter(w_off[7, 50], torch.tensor(1.0))  # one float off its block's grid
    assert few_rows.pack(w_off) is None
    assert few_rows.pack(w4[:, :80]) is None  # not whole blocks
    assert few_rows.pack(w4.double()) is None and few_rows.pack(w4.bfloat16()) is None


def _rounded_rows(x: torch.Tensor) -> torch.Tensor:
    """x [rows, in] as the int8 activations round it: per row and block of 32 inputs, to multiples of max |x| / 127
    (round half to even), in float64."""
    b = x.double().view(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    step = (amax.float() / 127).double()  # the kernel's scale, rounded to float32
    q = torch.round(b.float() * torch.where(amax > 0, 127 / amax.float(), 0.0)).double()  # its float32 multiply
    return (q * step).view_as(x)


def _int8_reference(x: torch.Tensor, w: torch.Tensor, fmt: str) -> torch.Tensor:
    """What packed_linear computes for Q4_1 or Q8_0 values w under int8 activations, in float64: the rounded x
    times the blocks' d * q, plus (Q4_1) each block's offset m times the float sum of x's 32 inputs."""
    if fmt == "q8_0":
        return _rounded_rows(x) @ w.double().T
    blocks = w.double().view(w.shape[0], -1, 32)
    m = blocks.amin(-1)  # [out, in / 32]: a Q4_1 block's q = 0 value
    return _rounded_rows(x) @ (blocks - m[..., None]).view_as(w).T + x.double().view(x.shape[0], -1, 32).sum(-1) @ m.T


# (weight format, activations)
FORMATS = [("q4_1", "float32"), ("q4_1", "int8"), ("q8_0", "float32"), ("q8_0", "int8")]


@needs_kernel
@pytest.mark.parametrize("fmt, activations", FORMATS)
@pytest.mark.parametrize("out", [301, 320])  # 301: a last tile padded, and an odd number of tiles
def test_packed_kernel_gives_each_row_what_it_gets_alone(fmt, activations, out, monkeypatch):
    """Every row count takes its own path through the kernel (two tiles decoded in registers for 1-2 rows,
    one for 3-4, a shared buffer past 4; with int8 activations on AVX2 one row, pairs, or groups of 3-4 folded through
    the outputs; on AVX-512 up to 8 rows a read); each row's result is
    the same bit for bit, near F.linear's (with int8 activations: near the rounded rows' products)."""
    monkeypatch.setattr(few_rows, "_ACTIVATIONS", activations)
    g = torch.Generator().manual_seed(out)
    w = (few_rows.q4_1_values if fmt == "q4_1" else _q8_0_values)(out, 96, g)
    x, b = torch.randn(MAX_ROWS, 96, generator=g), torch.randn(out, generator=g)
    p = few_rows.pack(w)
    assert p.kind == fmt
    together = few_rows.packed_linear(x, p, b)
    int8 = activations == "int8"
    expected = (_int8_reference(x, w, fmt) + b.double()).float() if int8 else F.linear(x, w, b)
    torch.testing.assert_close(together, expected, rtol=1e-5, atol=1e-5)
    if int8:  # the rounding is there: far from x's own products
        assert (together - F.linear(x, w, b)).abs().max() > 1e-3
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13):
                assert torch.equal(few_rows.packed_linear(x[:rows], p, b), together[:rows]), rows
                assert torch.equal(few_rows.packed_linear(x[rows:rows + 1], p, b), together[rows:rows + 1]), rows
            assert torch.equal(few_rows.packed_linear(x[None, 3:7], p, b), together[None, 3:7])  # [1, rows, in]
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("fmt, activations", FORMATS)
def test_packed_kernel_rounds_no_worse_than_float32_allows(fmt, activations, monkeypatch):
    """Against float64: each output within a few float32 roundings of the sum of its products' magnitudes
    (the kernel sums each block of 32 inputs, then scales it: an error in a scale or an offset is far above).
    With int8 activations the reference takes x rounded as the kernel rounds it: the integer sums are exact."""
    monkeypatch.setattr(few_rows, "_ACTIVATIONS", activations)
    g = torch.Generator().manual_seed(3)
    w = (few_rows.q4_1_values if fmt == "q4_1" else _q8_0_values)(301, 576, g)
    x = torch.randn(7, 576, generator=g)
    ref = _int8_reference(x, w, fmt) if activations == "int8" else F.linear(x.double(), w.double())  # [rows, out]
    magnitude = x.abs().double() @ w.abs().double().T  # [rows, out]
    err = (few_rows.packed_linear(x, few_rows.pack(w)).double() - ref).abs() / magnitude
    assert err.max() < 8 * torch.finfo(torch.float32).eps, err.max()


def _same_int8_floats(other, rows: tuple[int, ...], seed: int) -> None:
    """packed_linear_q8 of this build and of `other` (the kernel built with another body) give the same floats
    for each row count in `rows`, both formats."""
    assert other is not None
    g = torch.Generator().manual_seed(seed)
    for fmt in ("q4_1", "q8_0"):
        w = (few_rows.q4_1_values if fmt == "q4_1" else _q8_0_values)(301, 576, g)
        p = few_rows.pack(w)
        x, b = torch.randn(max(rows), 576, generator=g), torch.randn(301, generator=g)
        for n in rows:
            args = (x[:n], p.q, p.d, few_rows._EMPTY if p.m is None else p.m, p.out, b)
            assert torch.equal(few_rows.load().packed_linear_q8(*args), other.packed_linear_q8(*args)), (fmt, n)


@needs_kernel
@pytest.mark.skipif("avx512_vnni" not in few_rows.cpu_info()[1], reason="one body of packed_linear_q8 on this CPU")
def test_int8_products_are_the_same_floats_on_avx512_vnni_as_on_avx2():
    """packed_linear_q8 has an AVX-512 VNNI body and an AVX2 one (csrc/few_rows.cpp): the same integer block
    sums folded in the same order, so the same floats, whichever CPU a model runs on. Here the kernel is also
    built without VNNI (the AVX2 body; the AMX path needs VNNI too) and both run the same rows (1-9: the VNNI
    body's groups of 1-8 rows)."""
    avx2 = few_rows.build(few_rows.SOURCE, "the AVX2 body", ("-mno-avx512vnni",))
    _same_int8_floats(avx2, tuple(range(1, 10)), 8)


@needs_kernel
@pytest.mark.skipif(not {"amx_int8", "amx_tile", "avx512_vnni"} <= few_rows.cpu_info()[1], reason="no AMX on this CPU")
def test_int8_products_are_the_same_floats_on_amx_tiles_as_on_vnni():
    """On a CPU with AMX, passes of enough rows take its tiles (csrc/few_rows.cpp, tiles_pass_amx): the same integer
    block sums and fold as the VNNI body, so the same floats. Here the kernel is also built without AMX and both
    run 1-40 rows (16-row tiles: full, partial, and a second and third tile), both formats."""
    vnni = few_rows.build(few_rows.SOURCE, "the VNNI body", ("-mno-amx-int8", "-mno-amx-tile"))
    _same_int8_floats(vnni, (*range(1, 19), 31, 32, 33, 40), 9)


def test_packed_weights_are_kept_while_the_weight_is_unchanged():
    g = torch.Generator().manual_seed(6)
    w, other = few_rows.q4_1_values(8, 64, g), torch.randn(8, 64, generator=g)
    first = few_rows.packed(w)
    assert first is not None and few_rows.packed(w) is first  # packed once
    assert few_rows.packed(other) is None and few_rows.packed(other) is None
    w.mul_(3.0)  # written in place: a packing of the old values must not be used
    again = few_rows.packed(w)
    assert again is not first
    if again is not None and few_rows.load() is not None:
        torch.testing.assert_close(few_rows.packed_linear(torch.ones(1, 64), again), F.linear(torch.ones(1, 64), w))
    key = id(w)
    del w
    assert key not in few_rows._PACKED  # freed with its weight


def test_the_packed_route_runs_where_measured(monkeypatch):
    from draftheads import cpu_matmul

    g = torch.Generator().manual_seed(7)
    w = few_rows.q4_1_values(40, 64, g)
    ran = []
    monkeypatch.setattr(few_rows, "linear", lambda *a: ran.append("rows") or F.linear(*a))
    monkeypatch.setattr(few_rows, "packed_linear", lambda x, p, b=None: ran.append("packed") or F.linear(x, w, b))
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {threads: {1: "rows", 3: "rows", 4: "padded"}})
    # (most rows packed, rows, weight, kernel): the blocks' kernel at every row count up to its limit, whatever
    # the float32 route there (4: padded), prefills included; past it, or for float32 weights, the routes
    cases = [(MAX_ROWS, 1, w, "packed"), (MAX_ROWS, 3, w, "packed"), (0, 3, w, "rows"), (MAX_ROWS, 4, w, "packed"),
             (0, 4, w, None), (MAX_ROWS, 1, torch.randn(40, 64, generator=g), "rows"), (64, MAX_ROWS + 5, w, "packed"),
             (64, 64, w, "packed"), (64, 65, w, None), (MAX_ROWS, MAX_ROWS + 5, w, None)]
    for use, rows, weight, expect in cases:
        monkeypatch.setattr(cpu_matmul, "_PACKED_ROWS", {threads: use})
        ran.clear()
        cpu_matmul.linear(torch.randn(rows, 64, generator=g), weight)
        assert ran == ([expect] if expect else []), (use, rows, expect)
    ran.clear()
    cpu_matmul.linear(torch.randn(1, 64, generator=g), w.requires_grad_(True))  # gradients: never a C++ kernel
    assert ran == []


def _block_model(seed: int):
    """(a tiny Llama whose projections hold Q4_1 block values and its LM head Q8_0 ones, as the default model's
    do; the generator that made them, for the test to go on with)."""
    from tiny import tiny_model

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(few_rows.q4_1_values(*p.shape, g, scale=0.05))
            elif name == "lm_head.weight":
                p.copy_(_q8_0_values(*p.shape, g) * 20)
    return model, g


@needs_kernel
@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_a_model_of_gguf_block_weights_decodes_the_same_from_its_blocks(activations, monkeypatch):
    """The default model's weights are Q4_1 (layers) and Q8_0 (output embedding) values: decoded from the
    blocks, greedy speculative output equals plain greedy output, and the logits are the float32 weights'
    up to rounding (with int8 activations, up to x's rounding to 8 bits)."""
    from tiny import tiny_heads

    from draftheads import cpu_matmul, decoder_stack
    from draftheads.acceptance import SamplingConfig
    from draftheads.generate import Decoder, Stats
    from draftheads.tree import load_tree

    monkeypatch.setattr(few_rows, "_ACTIVATIONS", activations)
    model, g = _block_model(8)
    heads = tiny_heads(model, num_heads=3)
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {threads: dict.fromkeys(range(1, MAX_ROWS + 1), "rows")})
    calls = []
    real = few_rows.packed_linear
    monkeypatch.setattr(few_rows, "packed_linear", lambda *a: calls.append(a[1].kind) or real(*a))
    # op by op, so that every product passes through cpu_matmul (the decoder stack computes the same floats:
    # tests/test_decoder_stack.py)
    monkeypatch.setattr(decoder_stack, "ENABLED", False)
    prompt = torch.randint(0, 200, (12,), generator=g).tolist()

    def decode(packed: bool, speculative: bool) -> tuple[list[int], torch.Tensor]:
        monkeypatch.setattr(cpu_matmul, "_PACKED_ROWS", {threads: MAX_ROWS if packed else 0})
        dec = Decoder(model, heads if speculative else None, load_tree("medusa16", 3) if speculative else None)
        out = []
        for step in dec.steps(prompt, 32, SamplingConfig(), Stats()):
            out += step
            if len(out) >= 32:
                break
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
        return out[:32], dec.logits(x)

    _, logits = decode(packed=False, speculative=False)
    assert not calls
    plain, packed_logits = decode(packed=True, speculative=False)
    assert {"q4_1", "q8_0"} <= set(calls)
    if activations == "float32":  # two roundings of the same sums (scaled per block of 32 inputs), through 2 layers
        torch.testing.assert_close(packed_logits, logits, rtol=1e-5, atol=5e-5)
    else:  # x to ~2.5 digits in every product: near, not equal
        assert 1e-5 < (packed_logits - logits).abs().max() < 2e-2 * logits.abs().max()
    assert decode(packed=True, speculative=True)[0] == plain


@needs_kernel
def test_a_prefill_past_max_rows_takes_the_packed_kernel_where_measured(monkeypatch):
    """A prompt of more than MAX_ROWS tokens on weights of GGUF blocks: with packed_rows() above its length the
    lean forward prefills it on the packed kernel (fused products, C++ layer ops) and its hidden states are the
    MKL prefill's up to rounding; at MAX_ROWS it stays on MKL; greedy decoding after either prefill agrees.
    (Float32 activations: int8 ones round x in the packed products only, which this comparison would measure.)"""
    from draftheads import cpu_matmul, decoder_stack, layer_ops
    from draftheads.acceptance import SamplingConfig
    from draftheads.generate import Decoder, Stats
    from draftheads.kvcache import TreeKVCache

    monkeypatch.setattr(few_rows, "_ACTIVATIONS", "float32")
    model, g = _block_model(9)
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {threads: dict.fromkeys(range(1, MAX_ROWS + 1), "rows")})
    monkeypatch.setattr(decoder_stack, "ENABLED", False)  # op by op, so that the calls are seen here
    rows_seen, attended = [], []
    real, real_attention = few_rows.packed_linear, layer_ops.attention
    monkeypatch.setattr(few_rows, "packed_linear", lambda x, p, b=None: rows_seen.append(x.shape[0]) or real(x, p, b))
    monkeypatch.setattr(layer_ops, "attention", lambda q, *a: attended.append(q.shape[1]) or real_attention(q, *a))
    prompt = torch.randint(0, 200, (MAX_ROWS + 8,), generator=g)
    dec = Decoder(model)

    def prefill(most: int) -> tuple[torch.Tensor, list[int]]:
        monkeypatch.setattr(cpu_matmul, "_PACKED_ROWS", {threads: most})
        rows_seen.clear()
        attended.clear()
        cache = TreeKVCache.for_model(model, prompt.numel())
        h = dec.lean.hidden(cache, prompt, torch.arange(prompt.numel()), cache.attention_mask(
            torch.full((prompt.numel(),) * 2, torch.finfo(torch.float32).min).triu(1)))
        tokens = []
        for step in dec.steps(prompt.tolist(), 8, SamplingConfig(), Stats()):
            tokens += step
        return h, tokens

    on_mkl, mkl_tokens = prefill(MAX_ROWS)
    assert MAX_ROWS + 8 not in rows_seen and MAX_ROWS + 8 not in attended
    packed, packed_tokens = prefill(64)
    assert MAX_ROWS + 8 in rows_seen and MAX_ROWS + 8 in attended  # one packed product, the C++ attention
    torch.testing.assert_close(packed, on_mkl, rtol=1e-4, atol=1e-4)
    assert packed_tokens == mkl_tokens


def test_drafter_weights_round_to_q8_0_blocks_under_int8_activations_only(monkeypatch):
    """Under int8 activations a drafter's linear weights become Q8_0 values (within 1/254 of their block's largest
    magnitude) that pack() holds, so their products take the packed kernel; under float32 nothing changes; a
    width that is not whole blocks of 32 stays as it is."""
    from tiny import tiny_heads, tiny_model

    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, 96, generator=g)
    w[3, 32:64] = 0.0  # a block of zeros stays zeros
    r = few_rows.q8_0_rounded(w)
    assert r is not None and few_rows.pack(r).kind == "q8_0" and not r[3, 32:64].any()
    step = w.view(40, 3, 32).abs().amax(-1, keepdim=True) / 127
    assert ((r - w).view(40, 3, 32).abs() <= step / 2 * (1 + 1e-5)).all() and not torch.equal(r, w)
    assert few_rows.q8_0_rounded(torch.randn(4, 80, generator=g)) is None  # not whole blocks
    assert few_rows.q8_0_rounded(w.double()) is None

    heads = tiny_heads(tiny_model("llama"), num_heads=2)
    linears = [m for m in heads.modules() if isinstance(m, torch.nn.Linear)]
    before = [m.weight.clone() for m in linears]
    monkeypatch.setattr(few_rows, "_ACTIVATIONS", "float32")
    assert few_rows.round_drafter_weights(heads) == 0
    assert all(torch.equal(m.weight, b) for m, b in zip(linears, before))
    monkeypatch.setattr(few_rows, "_ACTIVATIONS", "int8")
    assert few_rows.round_drafter_weights(heads) == len(linears) > 0
    assert all(few_rows.pack(m.weight) is not None and not torch.equal(m.weight, b) for m, b in zip(linears, before))
