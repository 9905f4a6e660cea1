"""Issue 14's measurement in one command: draftheads on llama.cpp against llama.cpp's own greedy decoding.

1. `draftheads bench vicuna --engine llama.cpp`: on the same GGUF in the same run, llama.cpp's plain greedy
   decoding (the baseline), our loop without heads and with the heads (+ lookup), tokens/s, the outputs
   that differ from llama.cpp's (each explained by its top-2 logit gap), mean accepted tokens per step,
   and the step latency per tree size on llama.cpp.
2. The same step-latency curve for PyTorch's lean forward (the torch engine), beside llama.cpp's.

    .venv/bin/python scripts/bench_llamacpp.py [--limit 0] [--max-new-tokens 256] [--threads 2] [--out DIR]

Writes DIR/report.json, report.md and plots (the bench), and DIR/latency.json, latency.md (both curves).
Timings need a quiet machine: nothing else running on its cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SIZES = "1,2,4,8,12,16,24,32"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="first N vicuna questions (0: all 80)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    ap.add_argument("--latency-steps", type=int, default=8)
    ap.add_argument("--heads", default="default")
    ap.add_argument("--out", default="runs/bench_llamacpp")
    args = ap.parse_args()

    from draftheads.cli import main as cli

    rc = cli(["bench", "vicuna", "--engine", "llama.cpp", "--heads", args.heads, "--limit", str(args.limit),
              "--max-new-tokens", str(args.max_new_tokens), "--out", args.out, "--latency-sizes", SIZES,
              "--latency-steps", str(args.latency_steps), "--threads", str(args.threads)])
    if rc:
        return rc
    import draftheads
    from draftheads.backbone import chat_ids
    from draftheads.calibrate import step_latency
    from draftheads.questions import load_questions

    out = Path(args.out)
    rep = json.loads((out / "report.json").read_text())
    torch_dm = draftheads.load(heads=args.heads, engine="torch", lookup=False)
    first = chat_ids(torch_dm.tokenizer, load_questions("vicuna", 1)[0].turns[0])  # bench's latency prompt
    sizes = [int(s) for s in SIZES.split(",")]
    curves = {"llama.cpp": rep["verify_latency"],
              "torch": step_latency(torch_dm, first, sizes, steps=args.latency_steps)}
    (out / "latency.json").write_text(json.dumps(curves, indent=1) + "\n")
    lines = ["# Step latency per tree size: llama.cpp beside PyTorch's lean forward", "",
             f"Median ms per loop step, default heads, {args.threads} threads, prompt: the first vicuna question.", "",
             "| nodes | llama.cpp verify | torch verify | llama.cpp step | torch step |", "|---|---|---|---|---|"]
    for a, b in zip(curves["llama.cpp"], curves["torch"]):
        lines.append(f"| {a['size']} | {a['verify_s'] * 1e3:.1f} | {b['verify_s'] * 1e3:.1f} | "
                     f"{a['step_s'] * 1e3:.1f} | {b['step_s'] * 1e3:.1f} |")
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    o = rep["overall"]
    print(f"llama.cpp greedy {o['llamacpp']['tokens_per_s']:.1f} tok/s; draftheads on llama.cpp "
          f"{o['speculative']['tokens_per_s']:.1f} tok/s ({o['speculative']['speedup']:.2f}x), "
          f"{o['speculative']['mean_accepted']:.2f} tokens/step; outputs differing from llama.cpp's: "
          f"{rep['greedy_mismatches']['count']}", file=sys.stderr)
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
