"""`draftheads bench` and `draftheads calibrate` flags, registered into cli.py's parser. Kept apart
from bench.py so that building the parser (and `--help`) imports no torch."""

from __future__ import annotations

import argparse

# defined here, not in bench.py: no torch import
METHODS = ("transformers", "loop", "speculative", "lookup", "hybrid", "prompt_lookup")
QUESTIONS_HELP = ("a shipped question set by name (vicuna: 80 MT-bench-style questions in 9 categories) or a file: "
                  "MT-bench/Spec-Bench question JSONL, or a prompt file (JSON list, JSONL, text lines)")


def cmd_bench(args) -> None:
    from .bench import cmd_bench as run

    run(args)


def cmd_calibrate(args) -> None:
    from .bench import cmd_calibrate as run

    run(args)


def sizes(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be comma-separated integers, not {text!r}") from None
    if any(s < 1 for s in out):
        raise argparse.ArgumentTypeError("tree sizes must be >= 1")
    return out


def register(sub) -> None:
    from .cli import _add_model_args

    b = sub.add_parser("bench", help="time baseline, our loop, speculative decoding and prompt lookup on a prompt set",
                       description="Time transformers' generate, our loop, speculative decoding (heads, prompt lookup, "
                                   "both) and transformers' prompt lookup on a question set; write report.json, "
                                   "report.md and plots to --out. --no-lookup skips our lookup and hybrid methods.")
    b.add_argument("questions", help=QUESTIONS_HELP)
    _add_model_args(b)
    b.add_argument("--limit", type=int, default=10, help="first N questions (0: all)")
    b.add_argument("--max-new-tokens", type=int, default=128, help="most new tokens per answer")
    b.add_argument("--out", default="bench-report", help="directory for report.json, report.md and plots")
    b.add_argument("--categories", default=None, help="comma-separated categories to keep (default: all)")
    b.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (transformers, the baseline, required)")
    b.add_argument("--latency-sizes", type=sizes, default="1,2,4,8,16,32,64",
                   help="tree sizes for the verify-latency plot ('' to skip)")
    b.add_argument("--latency-steps", type=int, default=8, help="timed loop steps per tree size")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("calibrate", help="measure head accuracies and step latency; choose the fastest tree",
                       description="Measure the heads' accuracies and the step latency per tree size on this "
                                   "machine, and choose the tree with the most tokens/s.")
    _add_model_args(c)
    c.add_argument("--prompts", required=True, help="prompts to calibrate on, as bench's questions: " + QUESTIONS_HELP)
    c.add_argument("--out", default="tree.json", help="where to write the chosen tree and the measurements")
    c.add_argument("--limit", type=int, default=20, help="first N prompts (0: all)")
    c.add_argument("--max-nodes", type=int, default=64, help="largest tree considered, root included")
    c.add_argument("--max-new-tokens", type=int, default=64, help="greedy continuation length per prompt")
    c.add_argument("--latency-sizes", type=sizes, default="1,2,4,8,12,16,24,32,48,64",
                   help="tree sizes whose step latency is measured (interpolated in between)")
    c.add_argument("--latency-steps", type=int, default=8, help="timed loop steps per tree size")
    c.add_argument("--no-measure", dest="measure", action="store_false",
                   help="skip running generate with the chosen tree and medusa63 afterwards")
    c.add_argument("--measure-limit", type=int, default=10, help="prompts for that measurement (0: all)")
    c.add_argument("--write-to-heads", action="store_true", help="also store the tree in the heads' config.json")
    c.set_defaults(func=cmd_calibrate)

