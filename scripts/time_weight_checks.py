"""What the lean forward's per-pass weight checks cost on the default model (llama_forward.LlamaForward): its fused
products' check (`_fused_layers`) and the C++ decoder stack's (`_decoder_stack`), each called `--calls` times warm after
one decode, in microseconds a call. Run it once per revision (PYTHONPATH=<a worktree>/src) to compare them.

    .venv/bin/python scripts/time_weight_checks.py [--calls 3000] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import draftheads


def per_call_us(f, calls: int) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = draftheads.load(heads=None)
    m.generate("Hello there", max_new_tokens=4)
    lean = m.decoder.lean
    with torch.inference_mode():  # as decoding calls them
        fused = lean._fused_layers()
        print(f"fused products' check: {per_call_us(lean._fused_layers, a.calls):.1f} us a call")
        print(f"decoder stack's check: {per_call_us(lambda: lean._decoder_stack(1, fused), a.calls):.1f} us a call")


if __name__ == "__main__":
    main()
