"""One client against several `draftheads serve` configurations at once, one request to each in turn
(the finest interleaving, so that the machine's drift falls on all alike): tokens/s per configuration
over the same prompts. Used to look for what makes the batched worker at one client slower than the
serial one (docs/results.md, results of 2026-12-04, late night).

    python scripts/serve_one_client.py --prompts runs/batch_tune_prompts.jsonl --num 24 --max-tokens 64
    python scripts/serve_one_client.py --prompts runs/batch_tune_prompts.jsonl --num 12 --max-tokens 64 \
        --only batched,serial --profile runs/serve_prof   # each server under cProfile: DIR/<config>.prof

--no-stream asks for whole replies. `serial-again` and `batched-again` are second servers of the same
configuration: how far two identical processes drift apart.

Tune and diagnose on prompts that are neither training nor evaluation data (scripts/unused_prompts.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from draftheads.bench_serve import _free_port, ask, start_server
from draftheads.questions import load_questions

CONFIGS = {"batched": ["--max-batch", "8"], "serial": ["--max-batch", "1"],
           # a second identical process: how far two servers of one configuration drift apart
           "serial-again": ["--max-batch", "1"], "batched-again": ["--max-batch", "8"],
           "plain-batched": ["--max-batch", "8", "--heads", "none"],
           "batched-no-adapt-1024": ["--max-batch", "8", "--no-adapt-trees", "--max-seq-len", "1024"],
           "batched-2-slots-no-adapt": ["--max-batch", "2", "--no-adapt-trees"]}


def start_profiled(args: list[str], out: Path) -> tuple[subprocess.Popen, str]:
    """`draftheads serve` under cProfile (main thread: the decoding worker), writing `out` when interrupted."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "draftheads.cli", "serve",
                             "--port", str(port), "--model-name", "x", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{out.stem}: the server did not answer /health")


def proc_stat(pid: int) -> dict:
    """CPU seconds (user, system) and minor page faults of process `pid` so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {"user_s": int(fields[11]) / tick, "system_s": int(fields[12]) / tick, "minor_faults": int(fields[7])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--num", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--heads", default="default")
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations to run")
    ap.add_argument("--profile", default=None, help="run each server under cProfile, writing DIR/<config>.prof")
    ap.add_argument("--no-stream", action="store_true", help="whole replies instead of streamed ones")
    a = ap.parse_args()
    configs = {name: CONFIGS[name] for name in a.only.split(",")}
    prompts = [q.turns[0] for q in load_questions(a.prompts, a.num)]
    base = ["--threads", "2", "--dtype", a.dtype, "--heads", a.heads]
    servers, http = {}, httpx.Client(timeout=600)  # one connection per server, kept (bench_serve.ask)
    try:
        for name, extra in configs.items():
            if a.profile:
                Path(a.profile).mkdir(parents=True, exist_ok=True)
                servers[name] = start_profiled(base + extra, Path(a.profile) / f"{name}.prof")
            else:
                servers[name] = start_server(base, extra)
            ask(servers[name][1], "Say hi.", 8)  # warm-up
        totals = {name: [0, 0.0] for name in servers}
        before = {name: proc_stat(proc.pid) for name, (proc, _) in servers.items()}
        for p in prompts:
            for name, (_, url) in servers.items():
                r = ask(url, p, a.max_tokens, stream=not a.no_stream, client=http)
                totals[name][0] += r["tokens"]
                totals[name][1] += r["seconds"]
        for name, (tokens, seconds) in totals.items():
            after = proc_stat(servers[name][0].pid)
            d = {k: after[k] - before[name][k] for k in after}
            print(f"{name}: {tokens / seconds:.1f} tokens/s; per token: {1e3 * d['user_s'] / tokens:.2f} ms user, "
                  f"{1e3 * d['system_s'] / tokens:.2f} ms system, {d['minor_faults'] / tokens:.1f} minor page faults")
            health = httpx.get(servers[name][1] + "/health", timeout=10).json()
            ph = health.get("phases")  # the serial worker's passes include making the text
            if ph and ph["passes"]:
                print(f"  {1e3 * ph['passes_s'] / ph['passes']:.1f} ms a pass over {ph['passes']} passes")
    finally:
        http.close()
        for proc, _ in servers.values():
            if a.profile:  # an interrupted serve returns normally, so cProfile writes its file
                proc.send_signal(signal.SIGINT)
            else:
                proc.terminate()
        for proc, _ in servers.values():
            proc.wait(60)


if __name__ == "__main__":
    main()
