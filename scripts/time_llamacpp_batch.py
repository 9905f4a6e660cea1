"""What a batched llama.cpp decode costs (engine_llamacpp.LlamaCppSlots, the server's batch on `--engine llama.cpp`):
one token for each of 1, 2, 4 and 8 sequences per llama_decode, after a prompt each; median ms a decode over blocks of
10 decodes, the batch sizes taking turns, and a prompt's prefill. The default model's GGUF unless --backbone names one.

    .venv/bin/python scripts/time_llamacpp_batch.py [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import draftheads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=None, help="a .gguf (default: the default model's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="1,2,4,8")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sizes = [int(s) for s in a.sizes.split(",")]
    m = draftheads.load(backbone=a.backbone, heads=None, engine="llama.cpp")
    slots = m.decoder.engine.batch_slots(max(sizes), 1024)
    ids = m.prompt_ids("Explain what a hash table is, with an example in Python.")
    t = time.perf_counter()
    for s in range(max(sizes)):
        slots.prefill(s, ids)
    print(f"prefill of {len(ids)} tokens: {1e3 * (time.perf_counter() - t) / max(sizes):.1f} ms")
    pos, times = [len(ids)] * max(sizes), {b: [] for b in sizes}
    for _ in range(a.rounds):
        for b in sizes:
            block = []
            for _ in range(10):
                t = time.perf_counter()
                slots.step(list(range(b)), [1000] * b, pos[:b])
                block.append(time.perf_counter() - t)
                pos[:b] = [p + 1 for p in pos[:b]]
            times[b].append(statistics.median(block))
    for b, ts in times.items():
        ms = 1e3 * statistics.median(ts)
        print(f"{b} sequence(s): {ms:.1f} ms a decode, {ms / b:.1f} a sequence")


if __name__ == "__main__":
    main()
