"""One client against several `draftheads serve` configurations at once, one request to each in turn
(the finest interleaving, so that the machine's drift falls on all alike): tokens/s per configuration
over the same prompts. Used to look for what makes the batched worker at one client slower than the
serial one (README, results of 2026-12-04, late night).

    python scripts/serve_one_client.py --prompts runs/batch_tune_prompts.jsonl --num 24 --max-tokens 64

Tune and diagnose on prompts that are neither training nor evaluation data (scripts/unused_prompts.py).
"""

from __future__ import annotations

import argparse

from draftheads.bench_serve import ask, start_server
from draftheads.questions import load_questions

CONFIGS = {"batched": ["--max-batch", "8"], "serial": ["--max-batch", "1"],
           "batched, no adapt, 1024-token slots": ["--max-batch", "8", "--no-adapt-trees", "--max-seq-len", "1024"],
           "batched, 2 slots, no adapt": ["--max-batch", "2", "--no-adapt-trees"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--num", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--heads", default="default")
    a = ap.parse_args()
    prompts = [q.turns[0] for q in load_questions(a.prompts, a.num)]
    base = ["--threads", "2", "--dtype", a.dtype, "--heads", a.heads]
    servers = {}
    try:
        for name, extra in CONFIGS.items():
            servers[name] = start_server(base, extra)
            ask(servers[name][1], "Say hi.", 8)  # warm-up
        totals = {name: [0, 0.0] for name in servers}
        for p in prompts:
            for name, (_, url) in servers.items():
                r = ask(url, p, a.max_tokens)
                totals[name][0] += r["tokens"]
                totals[name][1] += r["seconds"]
        for name, (tokens, seconds) in totals.items():
            print(f"{name}: {tokens / seconds:.1f} tokens/s")
    finally:
        for proc, _ in servers.values():
            proc.terminate()


if __name__ == "__main__":
    main()
