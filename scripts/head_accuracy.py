"""Where heads are right: teacher-forced top-1 per head and per question category, on the backbone's own
greedy replies to a question file (an evaluation set: nothing here trains or calibrates anything).

    python scripts/head_accuracy.py --heads default --heads runs/x/heads --questions vicuna --limit 80 \
        --max-new-tokens 128 --out runs/acc.json

The replies are decoded once, batched and plainly (no heads), and every head set is scored on the same
positions: head k at position t is right when its top token equals reply token t+2+k (calibrate.head_ranks,
Hydra heads along the true path). Unconditional per head, so heads 2-4 read as "right at that offset",
not "accepted"; the decoding loop's mean accepted also needs the heads before it right.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

import draftheads
from draftheads.backbone import chat_ids
from draftheads.calibrate import PAST_END, head_ranks
from draftheads.questions import load_questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", action="append", required=True, help="heads directory or shipped name; repeat")
    ap.add_argument("--questions", default="vicuna")
    ap.add_argument("--limit", type=int, default=80)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    questions = load_questions(a.questions, a.limit)
    plain = draftheads.load(heads=None)
    replies = plain.generate_many([q.turns[0] for q in questions], max_batch=8, max_new_tokens=a.max_new_tokens)
    report = {"questions": a.questions, "limit": len(questions), "max_new_tokens": a.max_new_tokens, "heads": {}}
    for name in a.heads:
        dm = draftheads.load(heads=name, lookup=False)
        hits: dict[str, list[list[int]]] = defaultdict(lambda: [[0, 0] for _ in range(dm.heads.cfg.num_heads)])
        for q, r in zip(questions, replies):
            ranks = head_ranks(dm, chat_ids(dm.tokenizer, q.turns[0]), r.token_ids)  # [positions, heads]
            for key in (q.category, "all"):
                for k, col in enumerate(ranks.T):
                    hits[key][k][0] += int((col == 0).sum())
                    hits[key][k][1] += int((col != PAST_END).sum())
        report["heads"][name] = {key: {"positions": v[0][1], "top1": [h / max(n, 1) for h, n in v]}
                                 for key, v in sorted(hits.items())}
    lines = ["| heads | category | positions | top-1 heads 1-4 |", "|---|---|---|---|"]
    for name, cats in report["heads"].items():
        lines += [f"| {name} | {c} | {v['positions']} | {' '.join(f'{x:.3f}' for x in v['top1'])} |"
                  for c, v in cats.items()]
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
