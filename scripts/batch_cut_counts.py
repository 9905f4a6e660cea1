"""What cutting batched trees to their confident nodes keeps (batch.py, --draft-confidence): per table
tree and cut, the tree nodes verified and the tokens emitted per sequence and round, counted over whole
replies decoded `--batch` at a time in one process (counts: they hold on a noisy machine), and whether
every reply equals the plain batched one, and the milliseconds a round spends drafting, in the verify
pass and accepting (a round's, weighted by its sequences). Tokens/s (wall time of each configuration, run one after the
other, so machine drift falls on them unevenly) is printed beside them as a rough guide.

    python scripts/batch_cut_counts.py --prompts runs/batch_tune_prompts.jsonl --batch 8 --max-new-tokens 64 \
        --trees '[[[0]], [[0],[0,0]], [[0],[0,0],[0,0,0]]]' --cuts 0,0.2,0.3,0.5 --dtype bfloat16

Tune on prompts that are neither training nor evaluation data (scripts/unused_prompts.py).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import draftheads
from draftheads.batch import BatchDecoder, run_all
from draftheads.train.prompts import load_prompts
from draftheads.tree import Tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--heads", default="default")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoded together (2 x this many prompts)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--trees", default="[[[0]], [[0], [0, 0]]]", help="JSON list of table trees")
    ap.add_argument("--cuts", default="0,0.2,0.5")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = load_prompts(a.prompts)[:2 * a.batch]
    heads = draftheads.load(heads=a.heads, dtype=a.dtype, lookup=False)
    plain = draftheads.load(heads=None, dtype=a.dtype)
    configs = [(None, 0.0)] + [(Tree(t), float(c)) for t in json.loads(a.trees) for c in a.cuts.split(",")]
    print("| table tree | cut | nodes / sequence-round | tokens / sequence-round | replies that differ from plain | tokens/s "
          "| draft / verify / accept ms a round |")
    print("|---|---|---|---|---|---|---|")
    reference = None
    for tree, cut in configs:
        m = plain if tree is None else heads
        batch = BatchDecoder(m.decoder, a.batch, 1024, None, {1: tree} if tree else None, None, None, cut)
        t0 = time.perf_counter()
        out = run_all(batch, [m.iter_generate(p, batch=batch, max_new_tokens=a.max_new_tokens) for p in prompts])
        seconds = time.perf_counter() - t0
        ids = [r.token_ids for r in out]
        reference = reference or ids
        steps = sum(r.stats.steps for r in out)
        nodes, tokens = sum(r.stats.nodes for r in out) / steps, sum(len(r.token_ids) - 1 for r in out) / steps
        name = "plain" if tree is None else f"`{tree.to_json()}`"
        # every sequence of a round records that round's phase times: summed over sequences, per sequence-round
        phases = " / ".join(f"{1e3 * sum(getattr(r.stats, k) for r in out) / steps:.1f}"
                            for k in ("draft_s", "verify_s", "accept_s"))
        print(f"| {name} | {cut if tree else '-'} | {nodes:.3f} | {tokens:.3f} | {sum(x != y for x, y in zip(ids, reference))} | "
              f"{sum(len(i) for i in ids) / seconds:.1f} | {phases} |",
              flush=True)


if __name__ == "__main__":
    main()
