"""The few-row fp32 product in C++ (csrc/few_rows.cpp), compiled for this machine on first use.

On this project's 2-core AMD EPYC (AVX2), 30 layers of the default model's fp32 weights, 2 threads
(scripts/bench_linear.py; docs/verify_profile.md): 1 row 25.7 -> 14.5 ms, 4 rows 24.7 -> 16.6, 8 rows
40.3 -> 22.6, 16 rows 46.1 -> 35.9 against cpu_matmul's padded MKL product. MKL's GEMM packs the weights
before multiplying once x has more than a few rows, which reads them twice; the kernel reads each weight
row once for up to 8 rows of x (groups of 8 beyond that, over blocks of weights that stay in L2).
cpu_matmul.routes() measures it beside the other kernels and takes it only where it wins on the machine
at hand. It has no backward: cpu_matmul keeps products that need gradients off it.

`packed_linear` multiplies by weights held in GGUF blocks instead (Q4_1 or Q8_0, 32 inputs a scale),
where `pack` finds that they hold a float32 weight exactly: the default model comes from a Q4_1 GGUF
file (its output embedding Q8_0), so its float32 weights are such blocks' values, bit for bit. The kernel
multiplies x by the blocks' integer values and scales each block's sum once (d, then m times x's block sum,
as GGUF's dot products do), reading 6x (Q4_1) or 4x (Q8_0) fewer bytes: 30 layers at one row 14.4 -> 8.6 ms,
8 rows 22.5 -> 18.8 (scripts/bench_linear.py), the LM head 3.1 -> 1.6; with Q4_1 laid out as 8 nibbles per
output dword (stop 43) 6.9 and 17.0 ms; scaled per block (stop 46) ~5.4 and ~15.6, the LM head ~1.4
(scripts/compare_packed_revisions.py). Each output is one lane's sequence of the same operations whatever the
row count, so a row's result never depends on the rows beside it; it is not few_rows_linear's, so cpu_matmul
takes the packed kernel at every row count up to cpu_matmul.packed_rows() (prefills included) or at none.
Under `activations()` "int8" (the default, defaults.ACTIVATIONS) the same blocks multiply x rounded to 8 bits
per block of 32 inputs, in integers (`vpmaddubsw`), as llama.cpp's CPU kernels do: 30 layers at one row ~5.6
-> ~3.3 ms, 8 rows ~17 -> ~9.3, the LM head ~1.1 -> ~0.4 (scripts/compare_activations.py, stop 47). On AVX-512
VNNI its byte products are `vpdpbusd` (stop 48), and on a CPU with AMX tiles passes of 4+ rows (Q8_0) or 16+ rows
(Q4_1) take `tdpbssd`/`tdpbsud` (stop 49: 48 rows 0.79x the time, the LM head at 8 rows 0.80x): the same integer
block sums folded the same way, so the same floats on every CPU.

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
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from . import defaults
from .errors import one_of

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


# The bodies csrc/few_rows.cpp compiles, by what this CPU has: what a verified row costs depends on it most (rows a read
# of the weights: 2-4 on AVX2, up to 8 on AVX-512 VNNI; AMX tiles from 4 rows), so trees are calibrated per class
# (draftmodel.trees_key). On an AVX2 EPYC (stop 64) a third or fourth row costs 15-21% of a one-row pass, on a Zen 5
# with VNNI ~8%.
CPU_CLASSES = ("avx2", "avx512-vnni", "amx")


def cpu_class(flags: set[str] | None = None) -> str | None:
    """Which of CPU_CLASSES this CPU's kernels are (`flags`: /proc/cpuinfo's, else this machine's), as the C++
    sources' preprocessor picks their bodies under -march=native; None where they do not build (no AVX2 and FMA)."""
    if flags is None:
        return _machine_class()
    if not {"avx2", "fma"} <= flags:
        return None
    if not {"avx512_vnni", "avx512bw"} <= flags:
        return "avx2"
    return "amx" if {"amx_tile", "amx_int8"} <= flags else "avx512-vnni"


@cache
def _machine_class() -> str | None:
    return cpu_class(cpu_info()[1]) if platform.machine().lower() in ("x86_64", "amd64") else None


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built here (before trying), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is written for x86-64 with AVX2, not {platform.machine()}"
    if cpu_class() is None:
        return "this CPU lacks AVX2 or FMA"
    return None


@cache
def load():
    """The compiled module (its `few_rows_linear(x, w, b)`), or None where it cannot be built (logged once)."""
    return build(SOURCE, "the few-row C++ kernel")


def build(source: Path, what: str, cflags: tuple[str, ...] = ()):
    """`source` (a C++ file of csrc/) compiled for this CPU (with `cflags` after -march=native), or None where it
    cannot be built; `what` names it in the one-line warning that says why."""
    reason = unavailable_reason()
    if reason is None:
        from torch.utils import cpp_extension

        model, flags = cpu_info()
        # A changed header, or a source that another includes (decoder_stack.cpp), is another build
        others = [p.read_text() for p in sorted(source.parent.iterdir()) if p.suffix in (".h", ".cpp") and p != source]
        key = "|".join([source.read_text(), *others, model, " ".join(sorted(flags)), torch.__version__, *cflags])
        name = f"draftheads_{source.stem}_" + hashlib.sha256(key.encode()).hexdigest()[:16]
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
            return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=["-O3", "-march=native", "-fopenmp", *cflags],
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
    log.warning("%s is not used: %s", what, reason)
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


BLOCK = 32  # inputs per scale in Q4_1 and Q8_0, as in GGUF
TILE = 16  # output rows per tile of a packed weight (csrc/few_rows.cpp)


@dataclass(frozen=True)
class Packed:
    """A float32 weight [out, in] held in a GGUF block format it is exactly representable in, as tiles of
    16 output rows: q uint8 [tiles, in, 8] (Q4_1, w = d * q + m: each 8 inputs are 16 little-endian uint32,
    one per output, nibble s holding input 8 g + s) or int8 [tiles, in, 16] (Q8_0, w = d * q: each 4 inputs are
    16 little-endian 4-byte words, one per output, byte s holding input 4 g + s); d, m float32
    [tiles, in / 32, 16] (m None for Q8_0). `packed_linear` computes x @ w.T
    per block of 32 inputs as d * sum(x q) (+ m * sum(x)): within float32 rounding of x @ w.T."""

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    out: int

    @property
    def kind(self) -> str:
        return "q4_1" if self.m is not None else "q8_0"


def pack(w: torch.Tensor) -> Packed | None:
    """w [out, in] float32 as Q4_1 or Q8_0 blocks that decode to exactly w, bit for bit; None where no block
    format holds it (most float32 weights: only weights dequantised from such a file, like the default
    model's, are exactly representable). Q4_1 reads 6 times fewer bytes than float32, Q8_0 4 times."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.shape[1] % BLOCK or w.numel() == 0 or w.device.type != "cpu":
        return None
    w = w.detach()
    for fmt in (_q4_1, _q8_0):
        if fmt(w[:1]) is not None:  # one row first: a weight of no block format fails here, cheaply
            found = fmt(w)
            if found is not None:
                return _tiled(*found, out=w.shape[0])
    return None


def _blocks(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, BLOCK)  # [out, in / 32, 32]


def _exact(b: torch.Tensor, d: torch.Tensor, q: torch.Tensor, m: torch.Tensor | None) -> bool:
    """Whether blocks b [out, n, 32] decode exactly from scales d [out, n] and values q (and offsets m)."""
    decoded = d[..., None] * q if m is None else d[..., None] * q + m[..., None]  # d * q is exact: one rounding, as the kernel's FMA
    return bool(torch.equal(decoded, b))


def _q4_1(w: torch.Tensor) -> tuple | None:
    """(q [out, in], d, m [out, in / 32]) of w's Q4_1 blocks, or None."""
    b = _blocks(w)
    m = b.amin(-1)  # the block's q = 0 value is its smallest
    d = ((b.amax(-1) - m) / 15).half().float()  # GGUF keeps d in fp16
    if not torch.isfinite(d).all():
        return None
    q = torch.round((b - m[..., None]) / torch.where(d > 0, d, 1.0)[..., None]).clamp_(0, 15)
    return (q.reshape(w.shape), d, m) if _exact(b, d, q, m) else None


def _q8_0(w: torch.Tensor) -> tuple | None:
    """(q [out, in], d [out, in / 32], None) of w's Q8_0 blocks, or None."""
    b = _blocks(w)
    d, q = _q8_0_scales_values(b)
    if not torch.isfinite(d).all():
        return None
    return (q.reshape(w.shape), d, None) if _exact(b, d, q, None) else None


def _q8_0_scales_values(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks b [out, n, 32] -> Q8_0 scales d [out, n] (the block's largest magnitude is 127 d) and the nearest
    values q [out, n, 32] in [-127, 127]."""
    d = b.abs().amax(-1) / 127
    return d, torch.round(b / torch.where(d > 0, d, 1.0)[..., None]).clamp_(-127, 127)


def _tiled(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, out: int) -> Packed:
    """The kernel's layout of q [out, in] and d, m [out, in / 32]: output rows padded to whole tiles (zeros)."""
    pad = -out % TILE
    q, d = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, d))
    T, K = q.shape[0] // TILE, q.shape[1]
    q = q.view(T, TILE, K).transpose(1, 2)  # [tiles, in, 16]
    d = d.view(T, TILE, -1).transpose(1, 2).contiguous()  # [tiles, in / 32, 16]
    if m is None:
        words = q.to(torch.int8).reshape(T, K // 4, 4, TILE).transpose(2, 3)  # [tiles, in / 4, 16, 4]: byte s, input 4 g + s
        return Packed(words.reshape(T, K, TILE).contiguous(), d, None, out)
    m = torch.nn.functional.pad(m, (0, 0, 0, pad)).view(T, TILE, -1).transpose(1, 2).contiguous()
    shifts = (4 * torch.arange(8)).view(1, 1, 8, 1)
    words = (q.to(torch.int64).reshape(T, K // 8, 8, TILE) << shifts).sum(2)  # [tiles, in / 8, 16]: nibble s, input 8 g + s
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, as int32
    return Packed(words.view(torch.uint8).view(T, K, 8), d, m, out)


def q8_0_rounded(w: torch.Tensor) -> torch.Tensor | None:
    """w [out, in] float32 rounded to Q8_0 values, per block of 32 inputs d * q with q in [-127, 127] and
    d = max |w| / 127, such that `pack` holds them exactly; None where in is not whole blocks or some block's scale
    does not survive the round trip (then w stays as it is). Relative error per weight <= 1/254 of its block's
    largest magnitude."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.shape[1] % BLOCK or not torch.isfinite(w).all():
        return None
    d, q = _q8_0_scales_values(_blocks(w.detach()))
    rounded = (d[..., None] * q).reshape(w.shape)
    return rounded if _q8_0(rounded) is not None else None


def round_drafter_weights(module: torch.nn.Module) -> int:
    """Under int8 activations, every nn.Linear weight of a drafter (heads: CPU, float32) that Q8_0 blocks can hold
    is rounded to them in place, so that its products run on the packed kernel like the backbone's (Medusa's draft
    and Hydra++'s prefix-layer update cost ~8-17% of a step on the float path). Only the drafts can change, never the
    output: verification decides. Returns how many weights were rounded (0 under float32 activations)."""
    if _ACTIVATIONS != "int8":
        return 0
    done = 0
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu":
                rounded = q8_0_rounded(m.weight)
                if rounded is not None:
                    m.weight.copy_(rounded)
                    done += 1
    return done


def q4_1_values(out: int, width: int, generator: torch.Generator, scale: float = 0.01) -> torch.Tensor:
    """A float32 weight [out, width] of Q4_1 values, as a GGUF file's dequantised weights are: per block of
    32, an fp16 scale d and offset m and 4-bit q, the block spanning q = 0..15 as a quantiser's does."""
    shape = (out, width // BLOCK, 1)
    d = (torch.rand(shape, generator=generator) * scale).half().float()
    m = (torch.randn(shape, generator=generator) * 5 * scale).half().float()
    q = torch.randint(0, 16, (out, width // BLOCK, BLOCK), generator=generator)
    q[..., 0], q[..., 1] = 0, 15
    return (d * q + m).reshape(out, width)


_PACKED: dict[int, tuple] = {}  # id(weight) -> (weakref to it, its data_ptr, its version, Packed or None)


def packed(w: torch.Tensor) -> Packed | None:
    """`pack(w)`, kept while w lives unchanged (the same storage, not written in place since), so a model's
    weights are packed once, at their first few-row product (~10 ms a matrix)."""
    entry = _PACKED.get(id(w))
    version = _version(w)
    if entry is not None and entry[0]() is w and entry[1] == w.data_ptr() and entry[2] == version:
        return entry[3]
    key = id(w)
    _PACKED[key] = (weakref.ref(w, lambda _, key=key: _PACKED.pop(key, None)), w.data_ptr(), version, pack(w))
    return _PACKED[key][3]


def _version(w: torch.Tensor) -> int:
    # An inference tensor keeps no version counter (asking raises, ~10 us: the lean forward's fused weights
    # are such tensors, asked 120 times a pass); it is written in inference mode only.
    return -1 if w.is_inference() else w._version


def set_activations(kind: str | None) -> None:
    """What products of packed blocks multiply from now on, process-wide: "int8" (x rounded to 8 bits per block
    of 32 inputs, as llama.cpp does) or "float32" (x as it is); None leaves it (defaults.ACTIVATIONS, or
    $DRAFTHEADS_ACTIVATIONS where set)."""
    global _ACTIVATIONS
    if kind is not None and one_of(kind, defaults.ACTIVATION_KINDS, "activations") != _ACTIVATIONS:
        _ACTIVATIONS = kind
        from . import cpu_matmul

        cpu_matmul.forget_routes()  # the packed kernel's row limit was measured for the other kind


def activations() -> str:
    """The current setting of set_activations."""
    return _ACTIVATIONS


def rounds_activations(model) -> bool:
    """Whether our forward of `model` rounds x where transformers' own does not: int8 activations are set and the
    model's CPU float32 linear weights are GGUF blocks (its first nn.Linear's weight packs). False for a backbone
    that is no torch module (a GGUF on llama.cpp, which rounds as llama.cpp does whatever this setting)."""
    if not isinstance(model, torch.nn.Module):
        return False
    w = next((m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
    return _ACTIVATIONS == "int8" and w is not None and w.is_contiguous() and packed(w) is not None


def packed_linear(x: torch.Tensor, p: Packed, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] float32 @ w.T (+ b) -> [..., out] for the weight w that p holds (load() must have given the
    kernel). Under `activations()` "int8" each row of x is first rounded to 8 bits per block of 32 inputs
    (csrc: packed_linear_q8); under "float32" x is taken as it is, within float32 rounding of `linear(x, w, b)`.
    Either way a row's result does not depend on the rows beside it."""
    flat = x.dim() == 2 and x.is_contiguous()  # the lean forward's rows: no reshape either way (~1 us each)
    x2 = x if flat else x.reshape(-1, x.shape[-1]).contiguous()  # [rows, in]
    module = load()
    kernel = module.packed_linear_q8 if _ACTIVATIONS == "int8" else module.packed_linear
    y = kernel(x2, p.q, p.d, _EMPTY if p.m is None else p.m, p.out, _EMPTY if b is None else b)  # [rows, out]
    return y if flat else y.reshape(*x.shape[:-1], p.out)


_EMPTY = torch.empty(0)  # Q8_0's m, no bias
_ACTIVATIONS = one_of(os.environ.get("DRAFTHEADS_ACTIVATIONS") or defaults.ACTIVATIONS, defaults.ACTIVATION_KINDS,
                      "$DRAFTHEADS_ACTIVATIONS")
