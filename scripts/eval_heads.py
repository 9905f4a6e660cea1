"""Measure shipped heads: mean accepted tokens per step, tokens/s and the wall-clock ratio against
transformers' greedy `generate`, on held-out prompts, all in one process, interleaved per prompt.

    python scripts/eval_heads.py --heads src/draftheads/default_heads --limit 20 --max-new-tokens 128 \
        --trees medusa16,medusa8,chain3 --out runs/eval.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import draftheads
from draftheads.backbone import chat_ids
from draftheads.questions import question_file
from draftheads.train.prompts import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="default")
    ap.add_argument("--prompts", default=str(question_file("vicuna")))  # the shipped held-out set
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--trees", default="medusa16", help="comma-separated tree names or JSON path lists joined by ';'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-baselines", action="store_true", help="trees only: mean accepted, no speed ratios")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    trees = [json.loads(t) if t.startswith("[") else t for t in a.trees.split(";" if "[" in a.trees else ",")]
    prompts = load_prompts(a.prompts)[:a.limit]  # first turns of the held-out set
    dm = draftheads.load(heads=a.heads, lookup=False)
    model, tok = dm.backbone, dm.tokenizer
    plain = draftheads.DraftModel(draftheads.draftmodel.Backbone(model, tok, dm.backbone_name))
    eos = sorted(dm.eos_ids)
    rows = {"transformers": [0, 0.0], "loop": [0, 0.0]}
    spec = {json.dumps(t): {"tokens": 0, "time": 0.0, "accepted": [], "identical": 0} for t in trees}
    for i, p in enumerate(prompts):
        ref = None
        if not a.no_baselines:
            ids = chat_ids(tok, p)
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.max_new_tokens,
                                     do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            rows["transformers"][1] += time.perf_counter() - t0
            out = out[:next((j for j, t in enumerate(out) if t in eos), len(out))]
            rows["transformers"][0] += len(out)
            ref = plain.generate(p, max_new_tokens=a.max_new_tokens)
            rows["loop"][0] += len(ref.token_ids)
            rows["loop"][1] += ref.stats.total_s
        for t in trees:
            r = dm.generate(p, max_new_tokens=a.max_new_tokens, tree=t)
            s = spec[json.dumps(t)]
            s["tokens"] += len(r.token_ids)
            s["time"] += r.stats.total_s
            s["accepted"] += r.stats.accepted
            s["identical"] += int(ref is not None and r.token_ids == ref.token_ids)
        if ref is None:
            print(f"[{i + 1}/{len(prompts)}]", {k: round(sum(v["accepted"]) / max(1, len(v["accepted"])), 3)
                                                for k, v in spec.items()}, flush=True)
        else:
            print(f"[{i + 1}/{len(prompts)}] hf {len(out)} tok, loop {len(ref.token_ids)} tok, hf==loop "
                  f"{out == ref.token_ids}", flush=True)
    if a.no_baselines:
        print(json.dumps({k: {"mean_accepted": sum(v["accepted"]) / max(1, len(v["accepted"])),
                              "tok_s": v["tokens"] / v["time"]} for k, v in spec.items()}, indent=1))
        return
    base_tps = rows["transformers"][0] / rows["transformers"][1]
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "heads": str(a.heads),
              "transformers_tok_s": base_tps, "loop_tok_s": rows["loop"][0] / rows["loop"][1], "trees": {}}
    for name, s in spec.items():
        tps = s["tokens"] / s["time"]
        report["trees"][name] = {"mean_accepted": sum(s["accepted"]) / max(1, len(s["accepted"])), "tok_s": tps,
                                 "speedup_vs_transformers": tps / base_tps,
                                 "speedup_vs_loop": tps / report["loop_tok_s"],
                                 "identical_to_plain_greedy": f"{s['identical']}/{len(prompts)}"}
    print(json.dumps(report, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
