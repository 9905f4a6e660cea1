"""cpu_matmul's few-row linear equals F.linear up to float rounding, for every shape the loop uses."""

import pytest
import torch
import torch.nn.functional as F

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
    monkeypatch.setattr(cpu_matmul, "measure", lambda threads: calls.append(threads) or {2, 3, 4})
    assert cpu_matmul.routes() == {2, 3, 4} and calls == [torch.get_num_threads()]
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    assert cpu_matmul.routes() == {2, 3, 4} and len(calls) == 1  # the second process reads the cached table
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setenv("DRAFTHEADS_FEW_ROW_KERNEL", "stock")
    assert cpu_matmul.routes() == frozenset()
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {})
    monkeypatch.setenv("DRAFTHEADS_FEW_ROW_KERNEL", "padded")
    assert cpu_matmul.routes() == frozenset(range(1, MAX_ROWS + 1))


def test_measure_returns_row_counts_in_range():
    from draftheads.cpu_matmul import measure

    wins = measure(1, layers=1, repeats=1)
    assert wins <= set(range(1, MAX_ROWS + 1))
