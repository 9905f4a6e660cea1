"""One sequence's tree and cut, measured end to end: each top-1 chain of `--chains` verified whole and cut at
each of `--cuts` (the loop's min_prob: only the nodes the heads give at least that path probability), against
plain decoding, in one process, interleaved per prompt (the order rotated), so that the machine's drift falls
on every configuration alike. Reports tokens per step, nodes per step, tokens/s and the ratio to plain; every
reply is checked against plain greedy decoding. What calibrate predicts from its timed steps, checked by whole
replies (tune on prompts that are neither training nor evaluation data: scripts/unused_prompts.py).

    .venv/bin/python scripts/compare_cuts.py --heads default --prompts P --limit 40 --chains 1,2,3 --cuts 0,0.2,0.3
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

import draftheads
from draftheads.train.prompts import load_prompts
from draftheads.tree import chain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", default="default")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N prompts (e.g. calibrate's)")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--chains", default="1,2,3", help="chain depths")
    ap.add_argument("--cuts", default="0,0.2,0.3", help="path probabilities (0: the whole chain)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = load_prompts(a.prompts)[a.skip:a.skip + a.limit]
    dm = draftheads.load(heads=a.heads, lookup=False)
    plain = draftheads.load(heads=None)
    configs = {"plain": None} | {f"chain {d}, cut {c:g}": (d, c) for d in map(int, a.chains.split(","))
                                 for c in map(float, a.cuts.split(","))}
    rows = {k: {"steps": 0, "tokens": 0, "seconds": 0.0, "nodes": 0} for k in configs}
    replies: dict[str, list[list[int]]] = {k: [] for k in configs}  # per prompt, in prompt order
    names = list(configs)
    saved = dm.decoder.tree, dm.decoder.min_prob
    for i, p in enumerate(tqdm(prompts, desc="prompts")):
        for name in names[i % len(names):] + names[:i % len(names)]:
            if configs[name] is None:
                r = plain.generate(p, max_new_tokens=a.max_new_tokens)
            else:
                dm.decoder.tree, dm.decoder.min_prob = chain(configs[name][0]), configs[name][1]
                r = dm.generate(p, max_new_tokens=a.max_new_tokens)
            row = rows[name]
            row["steps"] += r.stats.steps
            row["tokens"] += r.stats.new_tokens
            row["seconds"] += r.stats.total_s
            row["nodes"] += r.stats.nodes
            replies[name].append(r.token_ids)
    dm.decoder.tree, dm.decoder.min_prob = saved
    base = rows["plain"]["tokens"] / rows["plain"]["seconds"]
    report = {"heads": a.heads, "prompts": a.prompts, "skip": a.skip, "limit": len(prompts),
              "max_new_tokens": a.max_new_tokens, "configs": {}}
    print("| configuration | tokens / step | nodes / step | tokens/s | x plain | identical to plain |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        same = sum(x == y for x, y in zip(replies[name], replies["plain"]))
        tps = row["tokens"] / row["seconds"]
        report["configs"][name] = {**row, "tokens_per_step": row["tokens"] / max(row["steps"], 1),
                                   "nodes_per_step": row["nodes"] / max(row["steps"], 1), "tokens_per_s": tps,
                                   "vs_plain": tps / base, "identical": f"{same}/{len(prompts)}"}
        c = report["configs"][name]
        print(f"| {name} | {c['tokens_per_step']:.3f} | {c['nodes_per_step']:.2f} | {tps:.1f} | {tps / base:.3f} | {c['identical']} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
