"""Write prompts of the given files that a distilled set did NOT use, as JSONL (`{"prompt": ...}` a
line): a calibration set that is neither training data nor evaluation data.

    python scripts/unused_prompts.py data/distilled FILE [FILE ...] --num 40 -o calib.jsonl

--max-chars, --ascii and --exclude narrow the pool (scripts/train_default_heads.sh: the chat-like set
the bf16 batch table is calibrated on).

A distilled directory counts every prompt its run PLANS (rebuilt from the manifest's command), also
those its unfinished shards will hold; a conversations JSONL file counts the prompts it holds.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
from pathlib import Path

from draftheads.train.distill import prompt_id
from draftheads.train.prompts import load_prompts


def planned_ids(directory: str) -> set[str]:
    from draftheads.backbone import load_backbone
    from draftheads.cli import build_parser
    from draftheads.train.cli import distill_config
    from draftheads.train.distill import plan

    command = json.loads((Path(directory) / "manifest.json").read_text())["command"]
    args = build_parser().parse_args(shlex.split(command)[1:])
    return {job.id for job in plan(distill_config(args), load_backbone(args.backbone).tokenizer)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("conversations")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--num", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--max-chars", type=int, default=1499, help="the longest prompt kept, in characters")
    ap.add_argument("--ascii", action="store_true", help="skip prompts with non-ASCII characters (most non-English ones)")
    ap.add_argument("--exclude", default="", help="comma-separated prompt ids (draftheads.train.distill.prompt_id) to skip")
    a = ap.parse_args()
    used = planned_ids(a.conversations) if Path(a.conversations).is_dir() else {
        json.loads(line)["id"] for line in open(a.conversations) if line.strip()}
    skip = used | set(filter(None, a.exclude.split(",")))
    pools = [[p for p in load_prompts(f) if prompt_id(p) not in skip and len(p) <= a.max_chars
              and (p.isascii() or not a.ascii)] for f in a.files]
    rng = random.Random(a.seed)
    for pool in pools:
        rng.shuffle(pool)
    picked = []  # round-robin over the files, so every source is represented
    while len(picked) < a.num and any(pools):
        for pool in pools:
            if pool and len(picked) < a.num:
                picked.append(pool.pop())
    with open(a.output, "w") as f:
        for p in picked:
            f.write(json.dumps({"prompt": p}) + "\n")
    print(f"{len(picked)} unused prompts from {len(a.files)} files -> {a.output} ({len(used)} used ones skipped)")


if __name__ == "__main__":
    main()
