"""The same heads in float32 and bfloat16, in one run: our loop without heads and with them in each dtype,
interleaved per prompt (so machine noise falls on all four alike). Per dtype: tokens/s, mean accepted,
how many replies equal that dtype's plain greedy reply; ratios against float32's plain loop. Each dtype
takes its own tree: the heads' calibrated one, or --tree DTYPE=TREE (calibrate's tree.json for that dtype).

    python scripts/compare_dtypes.py --heads default --tree bfloat16=runs/bf16/tree.json --limit 80 \
        --max-new-tokens 128 --out runs/bf16/compare.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from tqdm import tqdm

import draftheads
from draftheads.questions import question_file
from draftheads.train.prompts import load_prompts

DTYPES = ("float32", "bfloat16")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="default")
    ap.add_argument("--prompts", default=str(question_file("vicuna")))  # the shipped held-out set
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--tree", action="append", default=[], help="DTYPE=TREE (default: the heads' calibrated tree)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    trees = dict(t.split("=", 1) for t in a.tree)
    if set(trees) - set(DTYPES):
        ap.error(f"--tree takes DTYPE=TREE with DTYPE one of {', '.join(DTYPES)}")
    torch.set_num_threads(a.threads)
    prompts = load_prompts(a.prompts)[:a.limit]
    models = {}
    for dt in DTYPES:
        spec = draftheads.load(heads=a.heads, dtype=dt, tree=trees.get(dt), lookup=False)
        models[dt] = (draftheads.load(heads=None, dtype=dt), spec)
    for plain, spec in models.values():  # warm-up: first-call costs fall on no method
        plain.generate("Hello.", max_new_tokens=8)
        spec.generate("Hello.", max_new_tokens=8)
    rows = {dt: {"loop": [0, 0.0], "heads": [0, 0.0], "accepted": [], "identical": 0} for dt in DTYPES}
    for p in tqdm(prompts, desc="prompts"):
        for dt, (plain, spec) in models.items():
            ref, r = plain.generate(p, max_new_tokens=a.max_new_tokens), spec.generate(p, max_new_tokens=a.max_new_tokens)
            s = rows[dt]
            s["loop"][0] += len(ref.token_ids)
            s["loop"][1] += ref.stats.total_s
            s["heads"][0] += len(r.token_ids)
            s["heads"][1] += r.stats.total_s
            s["accepted"] += r.stats.accepted
            s["identical"] += int(r.token_ids == ref.token_ids)
    base = rows["float32"]["loop"][0] / rows["float32"]["loop"][1]
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "prompts": a.prompts, "limit": len(prompts), "max_new_tokens": a.max_new_tokens, "heads": a.heads,
              "dtypes": {}}
    for dt, s in rows.items():
        loop, heads = s["loop"][0] / s["loop"][1], s["heads"][0] / s["heads"][1]
        report["dtypes"][dt] = {
            "tree": models[dt][1].tree.to_json(), "loop_tok_s": loop, "heads_tok_s": heads,
            "mean_accepted": sum(s["accepted"]) / max(1, len(s["accepted"])),
            "heads_vs_own_loop": heads / loop, "loop_vs_fp32_loop": loop / base, "heads_vs_fp32_loop": heads / base,
            "identical_to_plain_greedy": f"{s['identical']}/{len(prompts)}"}
    print(json.dumps(report, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
