"""`draftheads bench` and `draftheads calibrate` flags, registered into cli.py's parser. Kept apart
from bench.py so that building the parser (and `--help`) imports no torch."""

from __future__ import annotations

import argparse

from . import defaults
from .errors import at_least

# defined here, not in bench.py: no torch import. Per engine: its methods, the baseline first.
METHODS = ("transformers", "loop", "speculative", "lookup", "hybrid", "prompt_lookup")
LLAMACPP_METHODS = ("llamacpp", "loop", "speculative", "lookup", "hybrid")  # llamacpp: llama.cpp's own greedy
QUESTIONS_HELP = ("a shipped question set by name (vicuna: 80 MT-bench-style questions in 9 categories; copying: 30 "
                  "prompts whose answers copy from them: translation, summarization, rag, code_edit, rewrite, "
                  "extraction) or a file: "
                  "MT-bench/Spec-Bench question JSONL, or a prompt file (JSON list, JSONL, text lines)")


def cmd_bench(args) -> None:
    if args.concurrency:
        from .bench_serve import cmd_bench_concurrency as run
    else:
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
        raise argparse.ArgumentTypeError(f"each must be at least 1, not {text!r}")
    return out


def probabilities(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated probabilities, not {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one probability")
    return out


def register(sub) -> None:
    from .cli import _add_model_args

    b = sub.add_parser("bench", help="time baseline, our loop, speculative decoding and prompt lookup on a prompt set",
                       description="Time transformers' generate, our loop, speculative decoding (heads, prompt lookup, "
                                   "both) and transformers' prompt lookup on a question set; write report.json, "
                                   "report.md and plots to --out. --no-lookup skips our lookup and hybrid methods.")
    b.add_argument("questions", help=QUESTIONS_HELP)
    _add_model_args(b)
    b.add_argument("--limit", type=at_least(0), default=10, help="first N questions (0: all)")
    b.add_argument("--max-new-tokens", type=at_least(1), default=128, help="most new tokens per answer")
    b.add_argument("--out", default="bench-report", help="directory for report.json, report.md and plots")
    b.add_argument("--categories", default=None, help="comma-separated categories to keep (default: all)")
    b.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)} (transformers, the baseline, required); with "
                        f"--engine llama.cpp of {','.join(LLAMACPP_METHODS)} (llamacpp, llama.cpp's own greedy "
                        "decoding, the baseline, required). Default: all of the engine's")
    b.add_argument("--latency-sizes", type=sizes, default="1,2,4,8,16,32,64",
                   help="tree sizes for the verify-latency plot ('' to skip)")
    b.add_argument("--latency-steps", type=at_least(2), default=8, help="timed loop steps per tree size (over 2 rounds)")
    b.add_argument("--concurrency", type=sizes, default=None,
                   help="instead: serve the model (heads batched, plain batched, heads one at a time) and load each "
                        "server with this many concurrent streaming clients, e.g. 1,2,4,8 (bench_serve.py); --lookup / "
                        "--no-lookup go to the heads servers")
    b.add_argument("--requests-per-client", type=at_least(1), default=2,
                   help="with --concurrency: requests = this x the largest concurrency, shared among the clients")
    b.add_argument("--max-batch", type=at_least(1), default=defaults.MAX_BATCH,
                   help="with --concurrency: the batched servers' --max-batch")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("calibrate", help="measure head accuracies and step latency; choose the fastest tree",
                       description="Measure the heads' accuracies and the step latency per tree size on this "
                                   "machine, and choose the tree with the most tokens/s.")
    _add_model_args(c)
    c.add_argument("--prompts", required=True, help="prompts to calibrate on, as bench's questions: " + QUESTIONS_HELP)
    c.add_argument("--out", default="tree.json", help="where to write the chosen tree and the measurements")
    c.add_argument("--limit", type=at_least(0), default=20, help="first N prompts (0: all)")
    c.add_argument("--max-nodes", type=at_least(1), default=64, help="largest tree considered, root included")
    c.add_argument("--max-new-tokens", type=at_least(1), default=64, help="greedy continuation length per prompt")
    c.add_argument("--latency-sizes", type=sizes, default="1,2,4,8,12,16,24,32,48,64",
                   help="tree sizes whose step latency is measured (interpolated in between)")
    c.add_argument("--latency-steps", type=at_least(2), default=8, help="timed loop steps per tree size (over 2 rounds)")
    c.add_argument("--no-measure", dest="measure", action="store_false",
                   help="skip running generate with the chosen tree and medusa63 afterwards")
    c.add_argument("--measure-limit", type=at_least(0), default=10, help="prompts for that measurement (0: all)")
    c.add_argument("--batch-sizes", type=sizes, default="",
                   help="also time whole rounds of the batched step (the server's --max-batch) at these batch sizes, "
                        "e.g. 1,2,4,8, and choose a tree for each ('' to skip)")
    c.add_argument("--draft-confidence", type=probabilities, default=defaults.BATCH_DRAFT_CONFIDENCES,
                   help="the cuts to choose from with one sequence's tree, and with --batch-sizes with each batch size's "
                        "(a cut tree verifies only the nodes the heads give at least this path probability; a cut for one "
                        "sequence is taken where it beats the best whole tree; serve takes the chosen ones unless told "
                        "another), comma-separated (default: "
                        f"{','.join(map(str, defaults.BATCH_DRAFT_CONFIDENCES))}; 0: whole trees)")
    c.add_argument("--choose-by-replies", type=int, default=16, metavar="N",
                   help="one sequence's tree, where the heads can cut: run the finalists (the best whole tree and up to 2 "
                        "more predicted within 10%% of it, and each chain at its best cut predicted within 10%% of the "
                        "fastest) on the first N prompts' "
                        "whole greedy replies, interleaved, and take the fastest, or within 1%% of it the fewest rows (0: the "
                        "prediction decides)")
    c.add_argument("--write-to-heads", action="store_true", help="also store the tree (and the trees per batch size) in "
                                                                  "the heads' config.json")
    c.add_argument("--cpu-class", action="store_true",
                   help="with --write-to-heads on a CPU: store the calibration for CPUs of this one's class only (avx2, "
                        "avx512-vnni or amx: the kernels' bodies, which set what a verified row costs), taken there before "
                        "the one for any CPU")
    c.set_defaults(func=cmd_calibrate)

