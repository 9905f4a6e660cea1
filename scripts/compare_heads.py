"""Two or more sets of heads for one backbone, in one run: mean accepted tokens per step, tokens/s, and
whether each output equals plain greedy decoding, on held-out prompts. Methods are interleaved per prompt
(plain loop, then every set of heads), so machine noise falls on all of them alike. Each set uses its own
calibrated tree (and its cut for one sequence) unless --tree is given. Ratios are against the first --heads.

    python scripts/compare_heads.py --heads default --heads hydra --limit 20 --max-new-tokens 128 \
        --out runs/hydra/compare.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from tqdm import tqdm

import draftheads
from draftheads.questions import question_file
from draftheads.train.prompts import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", action="append", required=True, help="a heads directory, 'default' or 'hydra'; repeat")
    ap.add_argument("--prompts", default=str(question_file("vicuna")))  # the shipped held-out set
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--tree", default=None, help="one tree for every set (default: each set's calibrated tree)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on a CPU)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if len(a.heads) < 2:
        ap.error("give at least two --heads")
    torch.set_num_threads(a.threads)
    prompts = load_prompts(a.prompts)[:a.limit]
    models = [draftheads.load(heads=h, tree=a.tree, dtype=a.dtype, lookup=False) for h in a.heads]
    plain = draftheads.DraftModel(draftheads.draftmodel.Backbone(models[0].backbone, models[0].tokenizer,
                                                                 models[0].backbone_name))
    for dm in [plain, *models]:  # warm-up: first-call costs (kernel choice, allocations) fall on no method
        dm.generate("Hello.", max_new_tokens=8)
    rows = {"plain loop": {"tokens": 0, "time": 0.0}}
    rows |= {h: {"tokens": 0, "time": 0.0, "accepted": [], "identical": 0, "nodes": 0, "steps": 0} for h in a.heads}
    for p in tqdm(prompts, desc="prompts"):
        ref = plain.generate(p, max_new_tokens=a.max_new_tokens)
        rows["plain loop"]["tokens"] += len(ref.token_ids)
        rows["plain loop"]["time"] += ref.stats.total_s
        for h, dm in zip(a.heads, models):
            r = dm.generate(p, max_new_tokens=a.max_new_tokens)
            rows[h]["tokens"] += len(r.token_ids)
            rows[h]["time"] += r.stats.total_s
            rows[h]["accepted"] += r.stats.accepted
            rows[h]["nodes"] += r.stats.nodes  # fewer than steps x tree size where the heads cut their tree
            rows[h]["steps"] += r.stats.steps
            rows[h]["identical"] += int(r.token_ids == ref.token_ids)
    loop_tps = rows["plain loop"]["tokens"] / rows["plain loop"]["time"]
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "prompts": a.prompts, "limit": len(prompts), "dtype": str(models[0].decoder.dtype), "max_new_tokens": a.max_new_tokens,
              "plain_loop_tok_s": loop_tps, "heads": {}}
    for h, dm in zip(a.heads, models):
        s = rows[h]
        report["heads"][h] = {"head_type": dm.heads.cfg.head_type, "tree": dm.tree.to_json(),
                              "cut": dm.decoder.min_prob, "nodes_per_step": s["nodes"] / max(1, s["steps"]),
                              "mean_accepted": sum(s["accepted"]) / max(1, len(s["accepted"])),
                              "tok_s": s["tokens"] / s["time"],
                              "identical_to_plain_greedy": f"{s['identical']}/{len(prompts)}"}
        report["heads"][h]["speedup_vs_loop"] = report["heads"][h]["tok_s"] / loop_tps
    first = report["heads"][a.heads[0]]
    for v in report["heads"].values():
        v["accepted_vs_first"] = v["mean_accepted"] / first["mean_accepted"]
        v["tok_s_vs_first"] = v["tok_s"] / first["tok_s"]
    print(json.dumps(report, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
