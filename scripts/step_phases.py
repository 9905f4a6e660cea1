"""Where one sequence's step goes, per decoding method: our loop without heads, prompt lookup + the n-gram store
without heads, the default (heads + lookup + store), and the default with the heads' nodes cut at each
`--min-prob` (Decoder.min_prob: only nodes whose path the heads give at least that probability), and the default
heads + lookup on each tree of `--trees` and the heads alone on each of `--alone-trees` (uncut, and at each
`--min-prob`). Every method runs
on every prompt, their order rotated per prompt; prints tokens/s (decoding steps only, prefill excluded), the ratio
over our loop, and per step: ms of draft, verify and accept, nodes verified and tokens emitted.

    .venv/bin/python scripts/step_phases.py --prompts P --limit 40 [--min-prob 0.2,0.35,0.5] [--trees '[[[0]]]']

Use prompts that are neither training nor evaluation data (scripts/unused_prompts.py).
"""

from __future__ import annotations

import argparse
import json

import torch

import draftheads
from draftheads.backbone import Backbone
from draftheads.draftmodel import DraftModel
from draftheads.questions import load_questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--min-prob", default="", help="cuts of the heads' nodes to time beside the default, comma-separated")
    ap.add_argument("--trees", default="[]", help="JSON list of trees (rank paths) to time the default heads + lookup on, "
                    "beside the calibrated one, e.g. '[[[0]], [[0], [1], [0, 0]]]'")
    ap.add_argument("--alone-trees", default="[]", help="JSON list of trees to time the default heads on without prompt "
                    "lookup and the store (uncut, and at each --min-prob)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    questions = load_questions(a.prompts, a.limit)
    default = draftheads.load()
    loop = DraftModel(Backbone(default.backbone, default.tokenizer, default.backbone_name, default.engine), None, None)
    lookup = draftheads.load(heads=None, lookup=True)
    methods = {"our loop": (loop, 0.0), "lookup + store": (lookup, 0.0), "default": (default, 0.0)}
    cuts = [float(p) for p in a.min_prob.split(",") if p]
    methods.update({f"default, cut {c}": (default, c) for c in cuts})
    for t in json.loads(a.trees):
        model = draftheads.load(tree=t)
        methods.update({f"{json.dumps(t)} + lookup" + (f", cut {c}" if c else ""): (model, c) for c in [0.0] + cuts})
    for t in json.loads(a.alone_trees):
        model = draftheads.load(tree=t, lookup=False)
        methods.update({f"{json.dumps(t)} alone" + (f", cut {c}" if c else ""): (model, c) for c in [0.0] + cuts})
    keys = ("new_tokens", "steps", "nodes", "draft_s", "verify_s", "accept_s")
    totals = {name: dict.fromkeys(keys + ("decode_s",), 0.0) for name in methods}
    names = list(methods)
    ids0 = loop.prompt_ids(questions[0].turns[0])
    for model, _ in methods.values():  # warm-up
        model.generate(torch.tensor(ids0), max_new_tokens=16)
    for i, q in enumerate(questions):
        ids = torch.tensor(loop.prompt_ids(q.turns[0]))
        for name in names[i % len(names):] + names[:i % len(names)]:
            model, cut = methods[name]
            model.decoder.min_prob = cut if model.heads is not None else 0.0
            s = model.generate(ids, max_new_tokens=a.max_new_tokens).stats
            t = totals[name]
            for k in keys:
                t[k] += getattr(s, k)
            t["new_tokens"] -= 1  # the prefill's token
            t["decode_s"] += s.total_s - s.prefill_s
    default.decoder.min_prob = 0.0
    base = totals["our loop"]["new_tokens"] / totals["our loop"]["decode_s"]
    print(f"{len(questions)} prompts, {a.max_new_tokens} new tokens, {a.threads} threads; per step: ms and counts")
    print(f"{'method':22s} {'tokens/s':>9s} {'x loop':>7s} {'draft':>6s} {'verify':>7s} {'accept':>7s} {'nodes':>6s} {'tokens':>7s}")
    for name, t in totals.items():
        n = max(t["steps"], 1)
        tps = t["new_tokens"] / t["decode_s"]
        print(f"{name:22s} {tps:9.1f} {tps / base:6.3f}x {1e3 * t['draft_s'] / n:6.3f} {1e3 * t['verify_s'] / n:7.3f} "
              f"{1e3 * t['accept_s'] / n:7.3f} {t['nodes'] / n:6.2f} {t['new_tokens'] / n:7.2f}")


if __name__ == "__main__":
    main()
