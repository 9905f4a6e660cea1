"""A request over HTTP against the same request through the Python API (docs/results.md, "One thread for torch
work"): the serial server at 1 client, then the same prompts one by one through
`draftheads.load(...).generate` in this process. The load test itself is `draftheads bench
--concurrency` (src/draftheads/bench_serve.py).

    .venv/bin/python scripts/bench_serve.py --requests 16 --max-tokens 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from draftheads.bench_serve import load_level, start_server
from draftheads.questions import load_questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    prompts = list(enumerate(q.turns[0] for q in load_questions("vicuna", args.requests)))
    proc, url = start_server(["--threads", str(args.threads)], ["--max-batch", "1"])
    try:
        load_level(url, prompts[:1], 1, 8)  # warm-up
        http_wall, _ = load_level(url, prompts, 1, args.max_tokens)
    finally:
        proc.terminate()
        proc.wait(30)

    import draftheads
    from draftheads.defaults import set_threads

    set_threads(args.threads)
    dm = draftheads.load(heads="default", lookup=False)
    dm.generate("Say hi.", max_new_tokens=8)
    api = []
    for _, p in prompts:
        t0 = time.perf_counter()
        dm.generate([{"role": "user", "content": p}], max_new_tokens=args.max_tokens)
        api.append(time.perf_counter() - t0)
    out = {"api_s_per_request": statistics.mean(api), "http_s_per_request": http_wall / len(prompts)}
    out["http_over_api"] = out["http_s_per_request"] / out["api_s_per_request"]
    print(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
