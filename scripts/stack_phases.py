"""Where the C++ decoder stack's time goes in plain batched passes: a copy of csrc/ whose DecoderStack.forward
times each phase (norms, the q/k/v product, rope and the cache write, attention, o_proj, gate/up, SiLU * up,
down_proj) is built in a temporary folder and replaces the stack for one run of scripts/time_batched_passes.py
(plain rounds of `--batch` sequences without heads, `--blocks` blocks of 5 passes). Only passes of one new row a
sequence are timed (the rounds; the prompts' prefills are not). Prints ms a pass per phase and the share of the stack; the pass's median beside it includes the LM head and the Python around the stack.
The timers cost ~1 us a phase (steady_clock), nothing in the repository's build changes.

    .venv/bin/python scripts/stack_phases.py --prompts runs/s61/tune_prompts.jsonl --batch 8 [--blocks 60]

Use prompts that are neither training nor evaluation data (scripts/unused_prompts.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from draftheads import decoder_stack, few_rows

PHASES = ["norms", "q/k/v product", "rope + cache write", "attention", "o product", "gate/up product", "silu * up",
          "down product"]
TIMERS = """#include <chrono>
static double phase_seconds_[8];
static int64_t timed_passes_;
static inline double now_() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
#define TIC(i) { const double t1_ = now_(); if (Q == 1) phase_seconds_[i] += t1_ - t0_; t0_ = t1_; }
// the seconds per phase, then the passes they cover; both reset
std::vector<double> phase_times() {
  std::vector<double> v(phase_seconds_, phase_seconds_ + 8);
  v.push_back(static_cast<double>(timed_passes_));
  for (auto& x : phase_seconds_) x = 0;
  timed_passes_ = 0;
  return v;
}
"""
# (the forward's lines, the same with a timer after each phase)
EDITS = [
    ("    torch::Tensor delta = EMPTY_;\n", "    torch::Tensor delta = EMPTY_;\n    if (Q == 1) ++timed_passes_;\n"),
    ("      torch::Tensor h = add_rms_norm(x, delta, l.in_norm, l.in_eps);  // [R, hidden]\n",
     "      double t0_ = now_();\n      torch::Tensor h = add_rms_norm(x, delta, l.in_norm, l.in_eps);  // [R, hidden]\n      TIC(0)\n"),
    ("      torch::Tensor qkv = l.qkv(h, int8);  // [R, (H + 2 KVH) D]\n",
     "      torch::Tensor qkv = l.qkv(h, int8);  // [R, (H + 2 KVH) D]\n      TIC(1)\n"),
    ("      write_cache(all, k, v, starts);\n", "      write_cache(all, k, v, starts);\n      TIC(2)\n"),
    ("      if (padded) o = o.index_select(0, rows);  // [R, H D]\n      h = add_rms_norm(x, l.o(o, int8), l.post_norm, l.post_eps);\n",
     "      if (padded) o = o.index_select(0, rows);  // [R, H D]\n      TIC(3)\n      torch::Tensor oo = l.o(o, int8);\n      TIC(4)\n"
     "      h = add_rms_norm(x, oo, l.post_norm, l.post_eps);\n      TIC(0)\n"),
    ("      torch::Tensor gate_up = l.gate_up(h, int8);  // [R, 2 I]\n",
     "      torch::Tensor gate_up = l.gate_up(h, int8);  // [R, 2 I]\n      TIC(5)\n"),
    ("      delta = l.down(silu_mul(gate_up.narrow(1, 0, I), gate_up.narrow(1, I, I)), int8);\n",
     "      torch::Tensor sm = silu_mul(gate_up.narrow(1, 0, I), gate_up.narrow(1, I, I));\n      TIC(6)\n"
     "      delta = l.down(sm, int8);\n      TIC(7)\n"),
    ("#include <pybind11/stl.h>\n", "#include <pybind11/stl.h>\n" + TIMERS),
    ("PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n", "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n  m.def(\"phase_times\", &phase_times);\n"),
]


def timed_stack(into: Path):
    """The decoder stack built from a copy of csrc/ under `into` with EDITS applied (each must match once)."""
    shutil.copytree(decoder_stack.SOURCE.parent, into, dirs_exist_ok=True)
    source = into / decoder_stack.SOURCE.name
    text = source.read_text()
    for old, new in EDITS:
        if text.count(old) != 1:
            sys.exit(f"stack_phases: decoder_stack.cpp changed; this line is not there once: {old.strip()!r}")
        text = text.replace(old, new)
    source.write_text(text)
    module = few_rows.build(source, "the timed decoder stack")
    if module is None:
        sys.exit("stack_phases: the timed decoder stack did not build here")
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        module = timed_stack(Path(tmp))
        decoder_stack.load = lambda: module  # every model loaded from here on builds its stack from the timed copy
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import time_batched_passes

        sys.argv = [sys.argv[0], "--prompts", a.prompts, "--models", "none", "--rounds", "plain", "--batch", str(a.batch),
                    "--blocks", str(a.blocks), "--threads", str(a.threads)]
        module.phase_times()
        time_batched_passes.main()
        *seconds, passes = module.phase_times()
    total = sum(seconds)
    print(f"\n{torch.get_num_threads()} threads, {a.batch} sequences a pass, {passes:.0f} passes; the C++ stack by phase:")
    print("| phase | ms a pass | share |\n|---|---:|---:|")
    for name, s in zip(PHASES, seconds):
        print(f"| {name} | {1e3 * s / passes:.2f} | {100 * s / total:.1f}% |")
    print(f"| the stack | {1e3 * total / passes:.2f} | 100% |")


if __name__ == "__main__":
    main()
