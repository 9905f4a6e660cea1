"""Does depth pay? Each head set on top-1 chains of several depths, against plain greedy decoding, in one
run, interleaved per prompt: mean accepted tokens per verify step, tokens/s and replies that differ from
plain greedy. Hydra++ heads 2-4 condition on the drafted path and are right 0.44-0.46 of the time on held-out
training conversations (Medusa's: 0.21-0.34), so on such data deeper chains should pay for them.

    python scripts/compare_depth.py --heads default:2,3 --heads hydra:2,3,4 --limit 20 --max-new-tokens 128 \
        --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch

import draftheads
from draftheads.questions import question_file
from draftheads.train.prompts import load_prompts
from draftheads.tree import chain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", action="append", required=True, help="HEADS:DEPTH,DEPTH,... (a heads directory or "
                                                                    "'default' / 'hydra'); repeat")
    ap.add_argument("--prompts", default=str(question_file("vicuna")))
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = load_prompts(a.prompts)[:a.limit]
    plain = draftheads.load(heads=None, dtype=a.dtype)
    configs = [("plain", plain, None)]
    for spec in a.heads:
        name, _, depths = spec.rpartition(":")
        model = draftheads.load(heads=name, dtype=a.dtype, lookup=False)
        configs += [(f"{name} chain{d}", model, chain(int(d))) for d in depths.split(",")]
    for _, m, tree in configs:
        m.generate(prompts[0], max_new_tokens=8, tree=tree)  # warm-up
    totals = {name: [0, 0, 0.0, 0] for name, _, _ in configs}  # tokens after the prefill's, steps, seconds, differ
    for p in prompts:
        reference = None
        for name, m, tree in configs:
            r = m.generate(p, max_new_tokens=a.max_new_tokens, tree=tree)
            reference = reference if reference is not None else r.token_ids
            t = totals[name]
            t[0] += len(r.token_ids) - 1
            t[1] += r.stats.steps
            t[2] += r.stats.total_s
            t[3] += r.token_ids != reference
    base = (totals["plain"][0] + len(prompts)) / totals["plain"][2]
    print("| heads and tree | mean accepted | tokens/s | vs plain | replies that differ |")
    print("|---|---|---|---|---|")
    for name, (tokens, steps, seconds, differ) in totals.items():
        rate = (tokens + len(prompts)) / seconds
        print(f"| {name} | {tokens / max(steps, 1):.3f} | {rate:.1f} | {rate / base:.2f}x | {differ} |")


if __name__ == "__main__":
    main()
