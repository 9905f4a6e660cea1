"""Decoding speed alone and beside a busy process, by thread count and OpenMP wait policy.

    .venv/bin/python scripts/bench_threads.py --max-new-tokens 64 --out runs/bench_threads.json

Each row is a fresh process (the OpenMP settings are read when torch starts) that loads the default
model with its shipped heads and times `generate` on three short prompts: our loop with heads, our
loop without heads, and transformers' `generate`. "busy" rows run beside a competing process that
keeps 2 threads of matmuls going (another PyTorch job on the same 2 cores), started before and
stopped after each row. Prints a Markdown table; the README's thread advice comes from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPTS = ["Explain what a hash table is.", "Write a short poem about rain.", "List three uses of a magnet."]

CHILD = r"""
import json, sys, time, torch
threads, n = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
import draftheads
from draftheads.draftmodel import load
prompts = json.loads(sys.argv[3])
out = {}
for name, heads in (("heads", "default"), ("no heads", None)):
    dm = load(heads=heads, lookup=False)
    dm.generate("Hi", max_new_tokens=8)
    t0, toks = time.perf_counter(), 0
    for p in prompts:
        toks += len(dm.generate(p, max_new_tokens=n).token_ids)
    out[name] = toks / (time.perf_counter() - t0)
model, tok = dm.backbone, dm.tokenizer
t0, toks = time.perf_counter(), 0
with torch.inference_mode():
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        g = model.generate(ids, max_new_tokens=n, do_sample=False)
        toks += g.shape[1] - ids.shape[1]
out["transformers"] = toks / (time.perf_counter() - t0)
print(json.dumps(out))
"""

BUSY = r"""
import torch, time
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
while True:
    a @ a
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    policies = {"default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}
    for busy in (False, True):
        for threads in (1, 2):
            for pname, env in policies.items():
                comp = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
                try:
                    if comp:
                        time.sleep(2)
                    done = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(args.max_new_tokens),
                                           json.dumps(PROMPTS)], env={**os.environ, **env}, capture_output=True,
                                          text=True, timeout=1800)
                finally:
                    if comp:
                        comp.kill()
                        comp.wait()
                if done.returncode:
                    raise SystemExit(done.stderr[-2000:])
                res = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"busy": busy, "threads": threads, "wait_policy": pname, **res})
                print(json.dumps(rows[-1]), flush=True)
    lines = ["| beside a busy process | threads | OMP wait policy | heads tok/s | no heads tok/s | transformers tok/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'yes' if r['busy'] else 'no'} | {r['threads']} | {r['wait_policy']} | {r['heads']:.1f} | "
                     f"{r['no heads']:.1f} | {r['transformers']:.1f} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
