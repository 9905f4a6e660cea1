"""A prompt's prefill on the default model, in pieces of the packed kernel's rows (what the engine does since stop
53: LlamaForward.prefill_rows) against one forward over the whole prompt (before: past those rows the products
went to torch's float32 GEMM), alternating in one process, median of `--repeats` per length (random ids, the
engine's prefill: the cache written, the logits of the last row). Also checks that both give the same logits
where the prompt fits one piece.

    .venv/bin/python scripts/time_prefill.py --lengths 64,128,200,400,800 [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import draftheads
from draftheads.llama_forward import LlamaForward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="64,128,200,400,800")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    engine = draftheads.load(heads=None).decoder.engine
    rows = engine.lean.prefill_rows()
    pieces = LlamaForward.prefill_rows
    print(f"pieces of {rows} rows (cpu_matmul.packed_rows) against one forward; ms, median of {a.repeats}")
    print("| prompt tokens | one forward | in pieces | ratio |\n|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n in map(int, a.lengths.split(",")):
        ids = torch.randint(100, 40000, (n,), generator=g)
        times = {"whole": [], "pieces": []}
        for _ in range(a.repeats):
            for how in times:
                LlamaForward.prefill_rows = pieces if how == "pieces" else (lambda self: None)
                cache = engine.new_cache(n + 8)
                with torch.inference_mode():
                    t = time.perf_counter()
                    engine.prefill(cache, ids, "last")
                    times[how].append(time.perf_counter() - t)
        LlamaForward.prefill_rows = pieces
        w, p = (1e3 * statistics.median(times[k]) for k in ("whole", "pieces"))
        print(f"| {n} | {w:.1f} | {p:.1f} | {p / w:.2f} |")


if __name__ == "__main__":
    main()
