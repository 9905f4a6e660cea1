"""The `draftheads` command: parse, call, print. A user's mistake is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UserError


def _add_model_args(p: argparse.ArgumentParser, heads_default="default") -> None:
    p.add_argument("--heads", default=heads_default,
                   help="heads directory, 'default' (shipped for the default backbone) or 'none' (plain decoding)")
    p.add_argument("--backbone", default=None, help="HF model directory or cached name (default: the one the heads name)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--tree", default=None, help="tree.json, medusa63, medusa<N> or chain<N> (default: the heads' own)")


def _load(args):
    from . import load

    heads = None if args.heads in (None, "none") else args.heads
    return load(heads=heads, backbone=args.backbone, device=args.device, dtype=args.dtype, tree=args.tree)


def cmd_generate(args) -> None:
    model = _load(args)
    chunks = model.iter_generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, acceptance=args.acceptance, stop=args.stop,
                                 seed=args.seed)
    result = None
    for chunk in chunks:
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        result = chunk.result or result
    s = result.stats
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "stats": s.to_dict()}))
        return
    print()
    print(f"[{s.new_tokens} tokens in {s.total_s:.2f}s: {s.tokens_per_second:.1f} tok/s | {s.steps} steps, "
          f"{s.mean_accepted:.2f} tokens/step | tree {s.tree_size} nodes | prefill {s.prefill_s * 1e3:.0f} ms, "
          f"per step: draft {_ms(s.draft_s, s.steps)}, verify {_ms(s.verify_s, s.steps)}, "
          f"accept+cache {_ms(s.accept_s, s.steps)} | finish: {result.finish_reason}]", file=sys.stderr)


def _ms(total: float, steps: int) -> str:
    return f"{total / max(steps, 1) * 1e3:.1f} ms"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftheads", description="Speculative decoding with draft heads.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a reply to a prompt (text to stdout, statistics to stderr)")
    g.add_argument("prompt")
    _add_model_args(g)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--acceptance", default="greedy", choices=["greedy", "typical", "exact"],
                   help="greedy (temperature 0, identical output), exact (same distribution), typical (lossy)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=cmd_generate)

    # Imported here: serve_cli reuses this module's helpers, so a top-level import would be circular.
    from . import bench, serve_cli
    from .train import cli as train_cli

    for module in (train_cli, bench, serve_cli):
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate" and args.temperature > 0 and args.acceptance == "greedy":
        args.acceptance = "exact"  # sampling from the CLI defaults to the lossless rule
    try:
        args.func(args)
    except UserError as e:
        print(f"draftheads: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
