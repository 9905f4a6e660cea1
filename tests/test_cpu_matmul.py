"""cpu_matmul's few-row linear equals F.linear up to float rounding, for every shape the loop uses."""

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
    assert cpu_matmul.routes() == {2: "padded", 3: "rows"} and calls == [torch.get_num_threads()]
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    assert cpu_matmul.routes() == {2: "padded", 3: "rows"} and len(calls) == 1  # the second process reads the cached table
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setenv("DRAFTHEADS_FEW_ROW_KERNEL", "stock")
    assert cpu_matmul.routes() == {}
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setenv("DRAFTHEADS_FEW_ROW_KERNEL", "padded")
    assert cpu_matmul.routes() == dict.fromkeys(range(1, MAX_ROWS + 1), "padded")
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setenv("DRAFTHEADS_FEW_ROW_KERNEL", "rows")
    monkeypatch.setattr(few_rows, "load", lambda: object())
    assert cpu_matmul.routes() == dict.fromkeys(range(1, MAX_ROWS + 1), "rows")
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setattr(few_rows, "load", lambda: None)  # forced but not built: the measured table instead
    assert cpu_matmul.routes() == {2: "padded", 3: "rows"} and len(calls) == 1


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
