"""Batched `model.generate([...])` with prompt lookup (decided by the model's rounds, round_costs.py) against the
same heads without it and plain decoding, in one process: each batch of prompts goes to all three in turn (the
order flips per call), so machine noise falls on all of them alike. Prints tokens/s, the ratios, whether every
output is the same, and the rounds the lookup model took per batch size (its `round_costs`).

    python scripts/compare_batched_lookup.py --prompts runs/default/calib_prompts.jsonl --batch 8 --reps 4 \
        --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import time

import torch

import draftheads
from draftheads.questions import load_questions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True, help="a prompt file (not an evaluation set)")
    ap.add_argument("--heads", default="default")
    ap.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    ap.add_argument("--reps", type=int, default=4, help="passes over the batches")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = [q.turns[0] for q in load_questions(a.prompts)]
    if len(prompts) < a.batch:
        raise SystemExit(f"{a.prompts}: {len(prompts)} prompts, fewer than --batch {a.batch}")
    batches = [prompts[k:k + a.batch] for k in range(0, len(prompts) - a.batch + 1, a.batch)]
    if len(prompts) % a.batch:  # the tail too, as a full batch ending with the last prompt
        batches.append(prompts[-a.batch:])
    models = {"lookup": draftheads.load(heads=a.heads, lookup=True),
              "no lookup": draftheads.load(heads=a.heads, lookup=False), "plain": draftheads.load(heads=None)}
    tokens, seconds, outs = dict.fromkeys(models, 0), dict.fromkeys(models, 0.0), {n: [] for n in models}
    for r in range(a.reps):
        for k, batch in enumerate(batches):
            names = list(models) if (r + k) % 2 == 0 else list(models)[::-1]
            for name in names:
                t0 = time.perf_counter()
                res = models[name].generate(batch, max_new_tokens=a.max_new_tokens)
                seconds[name] += time.perf_counter() - t0
                tokens[name] += sum(len(x.token_ids) for x in res)
                outs[name].append([x.token_ids for x in res])
    tps = {n: tokens[n] / seconds[n] for n in models}
    print(", ".join(f"{n} {v:.1f} tok/s" for n, v in tps.items()))
    print(f"lookup / no lookup {tps['lookup'] / tps['no lookup']:.3f}x, no lookup / plain "
          f"{tps['no lookup'] / tps['plain']:.3f}x; outputs identical: {outs['lookup'] == outs['no lookup'] == outs['plain']}")
    print("lookup's rounds per batch size (taken / all, recent pairs' ratio):",
          {b: f"{v['trees_rounds']}/{v['rounds']}, {v['trees_over_plain']:.2f}"
           for b, v in models["lookup"].round_costs.summary().items()})


if __name__ == "__main__":
    main()
