"""The packed few-row kernel (few_rows.packed_linear) of another git revision against the working tree's, in one
process: both revisions' few_rows.py and csrc/ are built side by side (each packs the weights in its own layout),
then 30 layers of SmolLM2-135M-shaped Q4_1 weights and the Q8_0 LM head [49152, 576] are timed at each row
count, the two kernels alternating, median of 9 passes (2 threads by default). Also says whether the two give
the same floats (they do when both decode the same weights and sum in the same order).

    .venv/bin/python scripts/compare_packed_revisions.py --against HEAD~1 [--rows 1,2,3,4,8,16,32] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from draftheads import few_rows
from draftheads.cpu_matmul import SHAPES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "src/draftheads"


def files_at(rev: str, names: list[str], into: Path) -> None:
    """The files `names` (paths under src/draftheads, or folders ending in /: their files) of git revision
    `rev`, written under `into` at the same relative paths."""
    for name in names:
        if name.endswith("/"):
            inside = subprocess.run(["git", "ls-tree", "--name-only", rev, f"{PACKAGE}/{name}"], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout.split()
            files_at(rev, [f.removeprefix(f"{PACKAGE}/") for f in inside], into)
            continue
        path = into / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(subprocess.run(["git", "show", f"{rev}:{PACKAGE}/{name}"], cwd=ROOT, check=True,
                                        capture_output=True).stdout)


def module_at(rev: str, into: Path):
    """few_rows.py of git revision `rev`, imported from a copy in a package under `into`, beside the modules it
    imports and its csrc/ (so it builds its own)."""
    package = f"draftheads_{rev.replace('~', '_').replace('^', '_')}"
    (into / package).mkdir()
    (into / package / "__init__.py").write_text("")
    files_at(rev, ["few_rows.py", "defaults.py", "errors.py", "csrc/"], into / package)
    sys.path.insert(0, str(into))
    try:
        module = importlib.import_module(f"{package}.few_rows")
    finally:
        sys.path.remove(str(into))
    assert module.load() is not None, f"the kernel of {rev} did not build here"
    return module


def q8_0_head(g: torch.Generator) -> torch.Tensor:
    """The default model's LM head shape in Q8_0 values: each block's largest magnitude 127 d."""
    d = (torch.rand(49152, 576 // 32, 1, generator=g) * 0.01).half().float()
    q = torch.randint(-127, 128, (49152, 576 // 32, 32), generator=g).float()
    q[..., 0] = 127
    return (d * q).reshape(49152, 576)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", required=True, help="a git revision whose kernel to compare")
    ap.add_argument("--rows", default="1,2,3,4,6,8,12,16,24,32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        kernels = {args.against: module_at(args.against, Path(tmp)), "working tree": few_rows}
        g = torch.Generator().manual_seed(0)
        layers = [few_rows.q4_1_values(o, i, g) for _ in range(30) for o, i in SHAPES]
        weights = {"30 layers (Q4_1)": layers, "LM head (Q8_0)": [q8_0_head(g)]}
        packs = {(name, k): [m.pack(w) for w in ws] for name, ws in weights.items() for k, m in kernels.items()}
        assert all(p is not None for ps in packs.values() for p in ps)
        # Where both revisions pack alike, both kernels read the same packed tensors: packs of their own sit at other
        # addresses, which moved the time of unchanged code by up to 7% (stop 62)
        for name in weights:
            a, b = (packs[name, k] for k in kernels)
            if all(torch.equal(x.q, y.q) and torch.equal(x.d, y.d) and (x.m is None) == (y.m is None)
                   and (x.m is None or torch.equal(x.m, y.m)) for x, y in zip(a, b)):
                packs[name, "working tree"] = a
        print(f"{args.threads} threads, ms a pass (median of 9), {args.against} against the working tree\n")
        print(f"| weights | rows | {args.against} | working tree | ratio | same floats |\n|---|---:|---:|---:|---:|---|")
        for name in weights:
            for rows in (int(r) for r in args.rows.split(",")):
                xs = {i: torch.randn(rows, i, generator=g) for i in (576, 1536)}
                outs = {k: [m.packed_linear(xs[p.q.shape[1]], p) for p in packs[name, k]] for k, m in kernels.items()}
                same = all(torch.equal(a, b) for a, b in zip(*outs.values()))
                times = {k: [] for k in kernels}
                for rep in range(9):
                    for k in (list(kernels) if rep % 2 == 0 else list(kernels)[::-1]):
                        t = time.perf_counter()
                        for p in packs[name, k]:
                            kernels[k].packed_linear(xs[p.q.shape[1]], p)
                        times[k].append(time.perf_counter() - t)
                old, new = (statistics.median(times[k]) * 1000 for k in kernels)
                print(f"| {name} | {rows} | {old:.2f} | {new:.2f} | {new / old:.3f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
