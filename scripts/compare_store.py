"""What the n-gram store adds to prompt lookup, in one run: our plain loop, the heads alone, heads + prompt lookup
without the store and with it (the default), interleaved per prompt so that machine noise falls on all alike.
Mean accepted tokens per step, tokens/s, nodes verified per step, and whether each output equals the plain loop's.

    python scripts/compare_store.py --prompts runs/default/calib_prompts.jsonl --limit 24 --max-new-tokens 128

--variant JSON (repeatable) adds heads + lookup with those LookupConfig fields, e.g. '{"store_min_prob": 0.5}'.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from tqdm import tqdm

import draftheads
from draftheads.backbone import Backbone
from draftheads.questions import question_file
from draftheads.train.prompts import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="default", help="a heads directory holding ngrams.safetensors, or 'default'")
    ap.add_argument("--prompts", default=str(question_file("vicuna")))
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[], help="LookupConfig fields as JSON; repeatable")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = load_prompts(a.prompts)[:a.limit]
    dm = draftheads.load(heads=a.heads)
    if dm.ngrams is None:
        raise SystemExit(f"{a.heads} holds no n-gram store: make one with draftheads ngrams --data DIR --heads DIR")
    bb = Backbone(dm.backbone, dm.tokenizer, dm.backbone_name)
    kw = {"batch_cuts": dm.batch_cuts, "ngrams": dm.ngrams}
    # the heads alone on their own tree and cut where calibrate chose dm's beside the lookup
    alone, alone_cuts = dm.tree_for(False)
    models = {"plain loop": draftheads.DraftModel(bb),
              "heads": draftheads.DraftModel(bb, dm.heads, alone, lookup=False, **{**kw, "batch_cuts": alone_cuts}),
              "heads + lookup, no store": draftheads.DraftModel(bb, dm.heads, dm.tree, lookup={"store_tokens": 0}, **kw),
              "heads + lookup + store": draftheads.DraftModel(bb, dm.heads, dm.tree, lookup=True, **kw)}
    for v in a.variant:
        models[f"heads + lookup + store {v}"] = draftheads.DraftModel(bb, dm.heads, dm.tree, lookup=json.loads(v), **kw)
    for m in models.values():  # warm-up: first-call costs fall on no method
        m.generate("Hello.", max_new_tokens=8)
    rows = {k: {"tokens": 0, "time": 0.0, "accepted": [], "nodes": 0, "steps": 0, "identical": 0} for k in models}
    for p in tqdm(prompts, desc="prompts"):
        ref = None
        for k, m in models.items():
            r = m.generate(p, max_new_tokens=a.max_new_tokens)
            ref = r.token_ids if ref is None else ref
            s = rows[k]
            s["tokens"] += len(r.token_ids)
            s["time"] += r.stats.total_s
            s["accepted"] += r.stats.accepted
            s["nodes"] += r.stats.nodes
            s["steps"] += r.stats.steps
            s["identical"] += int(r.token_ids == ref)
    base = rows["plain loop"]["tokens"] / rows["plain loop"]["time"]
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "prompts": a.prompts, "limit": len(prompts), "max_new_tokens": a.max_new_tokens,
              "store_contexts": dm.ngrams.entries, "methods": {}}
    for k, s in rows.items():
        report["methods"][k] = {"tok_s": s["tokens"] / s["time"], "vs_loop": s["tokens"] / s["time"] / base,
                                "mean_accepted": sum(s["accepted"]) / max(1, len(s["accepted"])),
                                "nodes_per_step": s["nodes"] / max(1, s["steps"]),
                                "identical_to_plain_loop": f"{s['identical']}/{len(prompts)}"}
    print(json.dumps(report, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
