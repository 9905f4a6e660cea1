"""The `draftheads` command: parse, call, print. A user's mistake is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import defaults
from .errors import UserError, at_least


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option's help, except where there is no value to show (None: the
    help says what happens then; on/off flags) or the help already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.nargs == 0 or "(default" in text:  # nargs 0: on/off flags
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands (argparse builds them with type(parent)) all show defaults and say a
    mistake in one line, as every other user error is said (argparse's own prints the whole usage first)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=defaults.THREADS,
                   help="torch CPU threads (0: torch's default, one per core). On a CPU shared with other jobs, "
                        "fewer threads avoid OpenMP threads spinning against them")
    p.add_argument("--activations", choices=defaults.ACTIVATION_KINDS, default=None,
                   help="what CPU products of weights in GGUF blocks (the default model's) multiply: x rounded to 8 bits "
                        "per block of 32, as llama.cpp does (faster), or x as it is (exact float32 products). "
                        f"Default: $DRAFTHEADS_ACTIVATIONS, else {defaults.ACTIVATIONS}")
    p.add_argument("--kv-cache", choices=defaults.KV_CACHE_KINDS, default=None,
                   help="what the KV cache of a float32 model on a CPU stores keys and values in: float16 halves the bytes "
                        "each step's attention reads (faster with many sequences or long contexts, as llama.cpp's "
                        f"default), float32 keeps them as computed. Default: $DRAFTHEADS_KV_CACHE, else {defaults.KV_CACHE}")


def _add_model_args(p: argparse.ArgumentParser, heads_default="default") -> None:
    p.add_argument("--heads", default=heads_default,
                   help="heads directory, 'default' or 'hydra' (the Medusa or Hydra++ heads shipped for the default "
                        "backbone) or 'none' (plain decoding)")
    p.add_argument("--backbone", default=None, help="HF model directory or cached name, or a .gguf file for the "
                                                     "llama.cpp engine (default: the one the heads name)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--tree", default=None,
                   help="tree.json, medusa63, medusa<N> or chain<N> (default: the heads' calibrated tree, else a "
                        "small one that is safe on the device)")
    p.add_argument("--engine", default=None, choices=["torch", "llama.cpp"],
                   help="what runs the backbone: torch (transformers) or llama.cpp (a GGUF; pip install "
                        "draftheads[llamacpp]). Default: llama.cpp for a .gguf --backbone, else torch")
    p.add_argument("--lookup", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt lookup: add branches copied from earlier in the prompt and reply to each step's tree, "
                        "verified in the same pass; works with --heads none (default: what calibrate --lookup measured for the "
                        "heads there, else on beside heads on torch, off on llama.cpp and without heads; calibrate: off, "
                        "--lookup also decides whether it pays beside the heads' tree)")
    add_threads(p)


def _load(args):
    from . import load

    heads = None if args.heads in (None, "none") else args.heads
    return load(heads=heads, backbone=args.backbone, device=args.device, dtype=args.dtype, tree=args.tree,
                lookup=args.lookup, engine=args.engine)


def _acceptance(args) -> str:
    """The rule generate runs. Sampling defaults to the lossless rule; at temperature 0 every rule is
    greedy decoding, which the user should hear rather than find out."""
    if args.temperature > 0:
        return "exact" if args.acceptance == "greedy" else args.acceptance
    if args.acceptance != "greedy":
        print(f"draftheads: note: --acceptance {args.acceptance} at temperature 0 is greedy decoding "
              "(pass --temperature > 0 to sample)", file=sys.stderr)
    return "greedy"


def cmd_generate(args) -> None:
    acceptance = _acceptance(args)
    model = _load(args)
    chunks = model.iter_generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, acceptance=acceptance, stop=args.stop,
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
    # new tokens = the prefill's token + steps x tokens/step (the histogram's mean), so the figures add up
    print(f"[{s.new_tokens} tokens in {s.total_s:.2f}s: {s.tokens_per_second:.1f} tok/s | prefill + {s.steps} steps x "
          f"{s.mean_accepted:.2f} tokens/step | tree {s.tree_size} node{'s' if s.tree_size != 1 else ''}{_lookup_note(model, s)} | "
          f"prefill {s.prefill_s * 1e3:.0f} ms, "
          f"per step: draft {_ms(s.draft_s, s.steps)}, verify {_ms(s.verify_s, s.steps)}, "
          f"accept+cache {_ms(s.accept_s, s.steps)} | finish: {result.finish_reason}]", file=sys.stderr)


def _lookup_note(model, s) -> str:
    if not model.lookup:
        return ""
    note = f" + lookup ({s.nodes / max(s.steps, 1):.1f} nodes/step verified, {s.lookup_accepted} tokens from lookup)"
    if model.heads is not None and s.tree_size == 1 and model.tree_by_lookup:  # calibrate's plain tree beside the lookup
        note += " (calibrated here: the heads' nodes did not pay beside the lookup; --no-lookup drafts with the heads)"
    return note


def _ms(total: float, steps: int) -> str:
    return f"{total / max(steps, 1) * 1e3:.1f} ms"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="draftheads", description="Speculative decoding with draft heads.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a reply to a prompt (text to stdout, statistics to stderr)",
                       description="Generate a reply to a prompt: text to stdout, statistics to stderr.")
    g.add_argument("prompt", help="the user message (wrapped in the backbone's chat template)")
    _add_model_args(g)
    g.add_argument("--max-new-tokens", type=at_least(1), default=defaults.MAX_NEW_TOKENS,
                   help="most new tokens; the reply usually ends earlier, at the end-of-turn token")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                            "holding this probability (1: off)")
    g.add_argument("--top-k", type=at_least(0), default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--acceptance", default="greedy", choices=["greedy", "typical", "exact"],
                   help="greedy (temperature 0, identical output), exact (same distribution; the rule when "
                        "--temperature > 0), typical (lossy)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=at_least(-2**63, 2**64 - 1), default=None, help="random seed for sampling (default: unseeded)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=cmd_generate)

    # Imported here: serve_cli reuses this module's helpers, so a top-level import would be circular.
    # None of these imports torch: `--help` stays fast.
    from . import bench_cli, serve_cli
    from .train import cli as train_cli

    for module in (train_cli, bench_cli, serve_cli):
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        defaults.set_threads(getattr(args, "threads", None), flag=hasattr(args, "threads"))
        if getattr(args, "activations", None):
            from .few_rows import set_activations

            set_activations(args.activations)
        if getattr(args, "kv_cache", None):
            from .kvcache import set_kv_cache

            set_kv_cache(args.kv_cache)
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
