"""The few-row fp32 product in C++ (csrc/few_rows.cpp), compiled for this machine on first use.

On this project's 2-core AMD EPYC (AVX2), 30 layers of the default model's fp32 weights, 2 threads
(scripts/bench_linear.py; docs/verify_profile.md): 1 row 25.7 -> 14.5 ms, 4 rows 24.7 -> 16.6, 8 rows
40.3 -> 22.6, 16 rows 46.1 -> 35.9 against cpu_matmul's padded MKL product. MKL's GEMM packs the weights
before multiplying once x has more than a few rows, which reads them twice; the kernel reads each weight
row once for up to 8 rows of x (groups of 8 beyond that, over blocks of weights that stay in L2).
cpu_matmul.routes() measures it beside the other kernels and takes it only where it wins on the machine
at hand. It has no backward: cpu_matmul keeps products that need gradients off it.

It is built with torch.utils.cpp_extension (a C++ compiler and ninja; ~25 s on 2 cores, once) with
-march=native, into torch's extension folder ($TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions) under a name that carries this CPU's model and flags, so
that a build for another CPU is never loaded. Without AVX2 and FMA, a compiler or ninja, `load()` gives
None and the reason, and cpu_matmul keeps its other kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "few_rows.cpp"
log = logging.getLogger(__name__)


def cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("", empty) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built here (before trying), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is written for x86-64 with AVX2, not {platform.machine()}"
    model, flags = cpu_info()
    if not {"avx2", "fma"} <= flags:
        return "this CPU lacks AVX2 or FMA"
    return None


@cache
def load():
    """The compiled module (its `few_rows_linear(x, w, b)`), or None where it cannot be built (logged once)."""
    reason = unavailable_reason()
    if reason is None:
        from torch.utils import cpp_extension

        model, flags = cpu_info()
        key = "|".join([SOURCE.read_text(), model, " ".join(sorted(flags)), torch.__version__])
        name = "draftheads_few_rows_" + hashlib.sha256(key.encode()).hexdigest()[:16]
        path = os.environ.get("PATH")
        torch_log = logging.getLogger(cpp_extension.__name__)
        level = torch_log.level
        try:
            # torch runs `ninja` from PATH; the pip-installed one sits beside this interpreter, which an
            # unactivated virtual environment does not put on PATH
            here = str(Path(sys.executable).parent)
            if shutil.which("ninja") is None and shutil.which("ninja", path=here):
                os.environ["PATH"] = os.pathsep.join(p for p in (here, path) if p)
            build = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
            build.mkdir(parents=True, exist_ok=True)
            _drop_stale_lock(build / "lock")
            torch_log.setLevel(logging.ERROR)  # its multi-line compiler warnings; a failure is said below in one line
            return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                      extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
        except Exception as e:  # no compiler, no ninja, a failed build: the other kernels remain
            lines = str(e).strip().splitlines()
            reason = f"its build failed ({lines[-1] if lines else type(e).__name__})"
        finally:
            torch_log.setLevel(level)
            if path is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = path
    log.warning("the few-row C++ kernel is not used: %s", reason)
    return None


def _drop_stale_lock(lock: Path, stale_s: float = 600.0) -> None:
    """torch's build lock outlives a build that was killed, and every later load then waits on it forever;
    no build takes 10 minutes, so an older lock is such a leftover."""
    try:
        if time.time() - lock.stat().st_mtime > stale_s:
            lock.unlink()
            log.warning("removed a stale build lock left by a killed build: %s", lock)
    except OSError:
        pass


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ w.T [in, out] (+ b) -> [..., out] through the kernel (load() must have given it);
    fp32 CPU tensors, w contiguous."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [rows, in]
    y = load().few_rows_linear(x2, w, b)  # [rows, out]
    return y.reshape(*x.shape[:-1], w.shape[0])
