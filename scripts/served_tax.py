"""What serving over HTTP costs the batched worker: `--clients` real clients against a `draftheads serve
--max-batch N` process on loopback, then the same prompts through `generate_many` in this process (no
HTTP, the same slots); tokens/s of each, the CPU seconds the clients and each server thread took, and the
worker's phases (/health). On a 2-core machine every CPU second the clients or the server's HTTP thread
take is one the verify passes lose.

    python scripts/served_tax.py --prompts P --num 64 --clients 8 --max-tokens 64 --repeat 2

Use prompts that are neither training nor evaluation data (scripts/unused_prompts.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import httpx
import torch

import draftheads
from draftheads import defaults
from draftheads.bench_serve import load_level, start_server
from draftheads.questions import load_questions


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of process `pid`, by thread id."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def served(prompts: list[str], a) -> None:
    proc, url = start_server(["--threads", str(a.threads), "--dtype", a.dtype, "--heads", a.heads],
                             ["--max-batch", str(a.max_batch)])
    try:
        load_level(url, [(0, prompts[0])], 1, 8)  # warm-up
        phases = lambda: httpx.get(url + "/health", timeout=10).json().get("phases", {})  # noqa: E731
        before, mine, ph0 = thread_cpu(proc.pid), resource.getrusage(resource.RUSAGE_SELF), phases()
        wall, results = load_level(url, list(enumerate(prompts)), a.clients, a.max_tokens)
        after, mine2 = thread_cpu(proc.pid), resource.getrusage(resource.RUSAGE_SELF)
        tokens = sum(r["tokens"] for r in results)
        clients = mine2.ru_utime - mine.ru_utime + mine2.ru_stime - mine.ru_stime
        threads = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
        ph = {k: v - ph0.get(k, 0) for k, v in phases().items()}  # this level's, without the warm-up
        print(f"served:     {tokens / wall:6.1f} tokens/s ({tokens} in {wall:.2f} s); CPU s: clients {clients:.2f}, "
              f"server threads {', '.join(f'{t:.2f}' for t in threads if t >= 0.05)}; phases "
              + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in ph.items()), flush=True)
    finally:
        proc.kill()
        proc.wait()


def in_process(prompts: list[str], a, model) -> None:
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    t = time.perf_counter()
    results = model.generate_many(msgs, max_batch=a.max_batch, max_new_tokens=a.max_tokens)
    wall = time.perf_counter() - t
    tokens = sum(len(r.token_ids) for r in results)
    print(f"in-process: {tokens / wall:6.1f} tokens/s ({tokens} in {wall:.2f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=defaults.MAX_BATCH)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--heads", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of (served, in-process), alternating")
    a = ap.parse_args()
    prompts = [q.turns[0] for q in load_questions(a.prompts, a.num)]
    torch.set_num_threads(a.threads)
    model = draftheads.load(heads=None if a.heads == "none" else a.heads, dtype=a.dtype)
    model.decoder.engine.use_prompt_cache(defaults.PROMPT_CACHE_TOKENS)  # as the server keeps one
    model.generate_many([[{"role": "user", "content": prompts[0]}]], max_new_tokens=8)  # warm-up
    for _ in range(a.repeat):
        served(prompts, a)
        in_process(prompts, a, model)


if __name__ == "__main__":
    main()
