"""One request at a time through the batched step (as the server runs it at one client: BatchDecoder with
served-round costs) against the solo decoding loop, in one process, interleaved per prompt: tokens/s,
steps and milliseconds per step by phase. --profile adds torch's profiler over a few steps of each: op
counts (they do not depend on the machine's speed) and self time, the ops that differ most first.

    python scripts/batched_vs_solo.py --prompts runs/batch_tune_prompts.jsonl --limit 16 --max-new-tokens 128 \
        --dtype bfloat16 [--profile]
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import draftheads
from draftheads.acceptance import SamplingConfig
from draftheads.batch import BatchDecoder, run_all
from draftheads.generate import Stats
from draftheads.round_costs import RoundCosts
from draftheads.train.prompts import load_prompts


def profile_ops(m, prompt, steps: int = 5) -> dict[str, tuple[int, float]]:
    """{"solo"/"batched": {op: (calls per step, self ms per step)}} after 4 warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    ids = m.prompt_ids(prompt)
    solo = m.decoder.steps(ids, 64, SamplingConfig(), Stats())
    batch = BatchDecoder(m.decoder, 8, 2048, None, m.batch_trees, None, None)
    one = batch.steps(ids, 64, SamplingConfig(), Stats())
    next(one)
    for _ in range(4):
        next(solo)
        batch.step()
        next(one)
    out = {}
    for name, step in (("solo", lambda: next(solo)), ("batched", lambda: (batch.step(), next(one)))):
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        out[name] = {e.key: (e.count // steps, e.self_cpu_time_total / steps / 1e3) for e in prof.key_averages()}
    solo.close()
    one.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = load_prompts(a.prompts)[:a.limit]
    m = draftheads.load(heads="default", dtype=a.dtype, lookup=False)
    costs = RoundCosts()
    batch = BatchDecoder(m.decoder, 8, 2048, None, m.batch_trees, None, costs)
    m.generate(prompts[0], max_new_tokens=16)
    totals = {k: collections.Counter() for k in ("solo", "batched")}
    for i, p in enumerate(prompts):
        for kind in ("solo", "batched") if i % 2 == 0 else ("batched", "solo"):
            t0 = time.perf_counter()
            if kind == "solo":
                r = m.generate(p, max_new_tokens=a.max_new_tokens)
            else:
                r = run_all(batch, [m.iter_generate(p, batch=batch, max_new_tokens=a.max_new_tokens)])[0]
            t = totals[kind]
            t["tokens"] += len(r.token_ids)
            t["seconds"] += time.perf_counter() - t0
            for key in ("steps", "draft_s", "verify_s", "accept_s"):
                t[key] += getattr(r.stats, key)
    print("| loop | tokens/s | steps | draft ms/step | verify ms/step | accept ms/step |")
    print("|---|---|---|---|---|---|")
    for kind, t in totals.items():
        n = max(t["steps"], 1)
        print(f"| {kind} | {t['tokens'] / t['seconds']:.1f} | {t['steps']} | {1e3 * t['draft_s'] / n:.2f} | "
              f"{1e3 * t['verify_s'] / n:.2f} | {1e3 * t['accept_s'] / n:.2f} |")
    print(f"batched over solo: {(totals['batched']['tokens'] / totals['batched']['seconds']) / (totals['solo']['tokens'] / totals['solo']['seconds']):.3f}x")
    if a.profile:
        ops = profile_ops(m, prompts[0])
        keys = sorted(set(ops["solo"]) | set(ops["batched"]),
                      key=lambda k: -abs(ops["batched"].get(k, (0, 0))[1] - ops["solo"].get(k, (0, 0))[1]))
        print("\n| op | calls a step, solo | batched | self ms a step, solo | batched |")
        print("|---|---|---|---|---|")
        for k in keys[:15]:
            (cs, ts), (cb, tb) = ops["solo"].get(k, (0, 0.0)), ops["batched"].get(k, (0, 0.0))
            print(f"| {k} | {cs} | {cb} | {ts:.2f} | {tb:.2f} |")
        print(f"| all ops | {sum(c for c, _ in ops['solo'].values())} | {sum(c for c, _ in ops['batched'].values())} | | |")


if __name__ == "__main__":
    main()
