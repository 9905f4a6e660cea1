"""The server under load, real clients on loopback: continuous batching against the one-at-a-time
worker, and a request over HTTP against the same request through the Python API.

    .venv/bin/python scripts/bench_serve.py --concurrency 1,2,4,8 --requests-per-client 2 --max-tokens 64 \
        --threads 2 --out runs/bench_serve

For each server configuration (heads batched `--max-batch 8`, plain batched `--heads none --max-batch
8`, serial `--max-batch 1`) a fresh `draftheads serve` process is started, warmed with one request,
and at each concurrency c, c client threads each send their share of the prompts (streamed, greedy);
measured: aggregate tokens/s, time to first token (p50/p95), time per output token after the first
(p50/p95), and whether every reply equals the prompt's reply decoded alone. Then, with no server
running, the same prompts one by one through `draftheads.load(...).generate` in this process: the
API's wall time per request, against the serial server's at concurrency 1. Prompts: the shipped
vicuna question set (held out from training). Writes report.json, report.md and concurrency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "draftheads.cli", "serve", "--port", str(port), "--threads", str(args.threads),
           "--queue-size", "64", "--model-name", "x", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            raise SystemExit("server did not start")
        time.sleep(0.5)


def ask(url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy chat request: text, time to first token, seconds, tokens."""
    t0 = time.perf_counter()
    first, text, tokens = None, "", 0
    body = {"model": "x", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                piece = c.get("delta", {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text += piece
    return {"text": text, "ttft": first or 0.0, "seconds": time.perf_counter() - t0, "tokens": tokens}


def load_level(url: str, prompts: list[str], clients: int, max_tokens: int) -> tuple[dict, list[dict]]:
    shares = [prompts[i::clients] for i in range(clients)]
    results: list[dict] = []
    lock = threading.Lock()

    def client(mine):
        for i, p in mine:
            r = ask(url, p, max_tokens)
            r["index"] = i
            with lock:
                results.append(r)
    threads = [threading.Thread(target=client, args=(s,)) for s in shares]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tpot = [(r["seconds"] - r["ttft"]) / max(r["tokens"] - 1, 1) for r in results]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    return {"clients": clients, "requests": len(results), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": q([r["ttft"] for r in results], 50), "ttft_p95": q([r["ttft"] for r in results], 95),
            "tpot_p50": q(tpot, 50), "tpot_p95": q(tpot, 95)}, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--requests-per-client", type=int, default=2, help="at the highest concurrency")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_serve")
    ap.add_argument("--configs", default="heads, batched;no heads, batched;heads, serial",
                    help="which server configurations, ';'-separated (the API comparison needs 'heads, serial')")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    from draftheads.questions import load_questions  # the shipped held-out set, by name

    n = max(levels) * args.requests_per_client
    prompts = [q.turns[0] for q in load_questions("vicuna")][:n]
    prompts = list(enumerate(prompts))
    configs = {"heads, batched": ["--max-batch", str(args.max_batch)],
               "no heads, batched": ["--heads", "none", "--max-batch", str(args.max_batch)],
               "heads, serial": ["--max-batch", "1"]}
    report = {"max_tokens": args.max_tokens, "threads": args.threads, "prompts": n, "configs": {}}
    alone: dict[int, str] = {}
    configs = {k: v for k, v in configs.items() if k in args.configs.split(";")}
    for name, extra in configs.items():
        proc, url = start_server(args, extra)
        try:
            ask(url, "Say hi.", 8)  # warm-up
            rows, texts = [], {}
            for c in levels:
                row, results = load_level(url, prompts, c, args.max_tokens)
                for r in results:
                    texts.setdefault(c, {})[r["index"]] = r["text"]
                rows.append(row)
                print(name, json.dumps(row), flush=True)
            if name == "heads, serial" or not alone:
                alone = texts[1]  # one client: each request decoded alone
            report["configs"][name] = {"args": extra, "levels": rows, "texts": texts}
        finally:
            proc.terminate()
            proc.wait(30)
    for name, cfg in report["configs"].items():
        if name.startswith("heads"):
            cfg["differ_from_alone"] = {c: sum(t[i] != alone[i] for i in t) for c, t in cfg["texts"].items()}

    if "heads, serial" not in report["configs"]:
        report["api_vs_http"] = None
    else:
        api_vs_http(args, prompts, levels, report)
    write_report(args, report, levels)


def api_vs_http(args, prompts, levels, report) -> None:
    """The Python API in this process, the same requests one by one."""
    import draftheads
    from draftheads.defaults import set_threads

    set_threads(args.threads)
    dm = draftheads.load(heads="default")
    dm.generate("Say hi.", max_new_tokens=8)
    api = []
    for i, p in prompts[:levels[0] * args.requests_per_client]:
        t0 = time.perf_counter()
        dm.generate([{"role": "user", "content": p}], max_new_tokens=args.max_tokens)
        api.append(time.perf_counter() - t0)
    serial1 = report["configs"]["heads, serial"]["levels"][0]
    report["api_vs_http"] = {"api_s_per_request": statistics.mean(api),
                             "http_s_per_request": serial1["wall_s"] / serial1["requests"],
                             "http_over_api": serial1["wall_s"] / serial1["requests"] / statistics.mean(api)}
    print(json.dumps(report["api_vs_http"]))


def write_report(args, report, levels) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["| config | clients | tokens/s | TTFT p50 / p95 s | per-token p50 / p95 ms | differ from alone |",
             "|---|---|---|---|---|---|"]
    for name, cfg in report["configs"].items():
        for row in cfg["levels"]:
            d = cfg.get("differ_from_alone", {}).get(row["clients"], "n/a")
            lines.append(f"| {name} | {row['clients']} | {row['tokens_per_s']:.1f} | {row['ttft_p50']:.2f} / "
                         f"{row['ttft_p95']:.2f} | {1000 * row['tpot_p50']:.0f} / {1000 * row['tpot_p95']:.0f} | {d} |")
    a = report["api_vs_http"]
    if a:
        lines.append(f"\nPython API {a['api_s_per_request']:.2f} s per request, HTTP (serial, 1 client) "
                     f"{a['http_s_per_request']:.2f} s: {a['http_over_api']:.2f}x")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, cfg in report["configs"].items():
        ax.plot([r["clients"] for r in cfg["levels"]], [r["tokens_per_s"] for r in cfg["levels"]], marker="o",
                label=name)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_xticks(levels)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "concurrency.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
