"""`draftheads bench --concurrency 1,2,4,8`: the server under load, real clients on loopback.

For each server configuration (heads batched `--max-batch N`, plain batched `--heads none --max-batch
N`, heads serial `--max-batch 1`) a `draftheads serve` process is started and warmed with one request;
all of them run at once, and at each concurrency c they take turns: c client threads send their share
of the prompts (streamed, greedy) to one server, then to the next; half of the prompts in one order of
the servers, the other half in the reverse order, so that a drift in the machine's speed during a level
weighs on all servers alike (this machine is shared).
Measured per level: aggregate tokens/s, time to first token (p50/p95), time per output token after
the first (p50/p95), and how many replies differ from the serial server's reply at 1 client (each
request decoded alone). Writes report.json, report.md and concurrency.png to --out.
"""

from __future__ import annotations

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

from .errors import UserError, output_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_args: list[str], extra: list[str]) -> tuple[subprocess.Popen, str]:
    """A `draftheads serve` process on a free loopback port, once /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "draftheads.cli", "serve", "--port", str(port), "--queue-size", "64",
           "--model-name", "x", *model_args, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
    while True:
        if proc.poll() is not None:
            err = (proc.stderr.read() or "").strip().splitlines()
            raise UserError(f"the server did not start: {err[-1] if err else ' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise UserError("the server did not answer /health within 300 s")
        time.sleep(0.5)


def ask(url: str, prompt: str, max_tokens: int, stream: bool = True, client: httpx.Client | None = None) -> dict:
    """One greedy chat request, streamed unless `stream` is False: its text, time to first token (the whole
    reply's when not streamed) and seconds (wall), tokens. client: the caller's httpx.Client, kept across its
    requests as real clients keep theirs (openai's does): a new one per request costs ~22 ms of CPU (its
    TLS context, even for plain HTTP), which on this 2-core machine the clients take from the server."""
    if client is None:
        with httpx.Client(timeout=600) as own:
            return ask(url, prompt, max_tokens, stream, own)
    t0 = time.perf_counter()
    first, text, tokens = None, "", 0
    body = {"model": "x", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    if not stream:
        r = client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        reply, end = r.json(), time.perf_counter()
        return {"text": reply["choices"][0]["message"]["content"], "ttft": end - t0, "seconds": end - t0,
                "tokens": reply["usage"]["completion_tokens"], "start": t0, "end": end}
    body["stream_options"] = {"include_usage": True}
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
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
    end = time.perf_counter()
    return {"text": text, "ttft": first or 0.0, "seconds": end - t0, "tokens": tokens, "start": t0, "end": end}


def _quantile(xs: list[float], p: int) -> float:
    return statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]


def load_level(url: str, prompts: list[tuple[int, str]], clients: int, max_tokens: int) -> tuple[float, list[dict]]:
    """`clients` threads, each sending its share of `prompts` one after another: (wall seconds, results)."""
    results: list[dict] = []
    lock = threading.Lock()
    # The clients start together: a thread started late could find another's short replies already done, and the
    # level would have no stretch with every client sending (full_load: none)
    together = threading.Barrier(clients)

    def client(k, mine):
        with httpx.Client(timeout=600) as http:  # one connection per client, kept (ask)
            together.wait()
            for i, p in mine:
                r = ask(url, p, max_tokens, client=http)
                r["index"], r["client"] = i, k
                with lock:
                    results.append(r)
    threads = [threading.Thread(target=client, args=(i, prompts[i::clients])) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if len(results) < len(prompts):
        raise UserError(f"{len(prompts) - len(results)} requests failed at {clients} clients")
    return wall, results


def full_load(results: list[dict]) -> tuple[float, float]:
    """(tokens, seconds) of the stretch of one load_level run when every client still had requests to send:
    from the last client's first request to the first client's last reply. A level's total also holds its
    drain, when the clients that finished early leave the others a smaller batch (greedy replies of the
    same length keep a plain server in lockstep, so its drain is short; speculative ones drift apart).
    Tokens after a request's first arrive evenly over the rest of it (an approximation: the stream does
    not say how many tokens each chunk holds)."""
    starts, ends = {}, {}
    for r in results:
        k = r["client"]
        starts[k], ends[k] = min(starts.get(k, r["start"]), r["start"]), max(ends.get(k, r["end"]), r["end"])
    lo, hi = max(starts.values()), min(ends.values())
    tokens = 0.0
    for r in results:
        first = r["start"] + r["ttft"]
        tokens += lo <= first <= hi and r["tokens"] > 0
        if r["tokens"] > 1 and r["end"] > first:
            tokens += (r["tokens"] - 1) * max(0.0, min(r["end"], hi) - max(first, lo)) / (r["end"] - first)
    return tokens, max(hi - lo, 0.0)


def level_row(clients: int, wall: float, results: list[dict]) -> dict:
    """Aggregate tokens/s over `wall` seconds of serving, and the requests' latency percentiles."""
    tpot = [(r["seconds"] - r["ttft"]) / max(r["tokens"] - 1, 1) for r in results]
    ttft = [r["ttft"] for r in results]
    return {"clients": clients, "requests": len(results), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": _quantile(ttft, 50), "ttft_p95": _quantile(ttft, 95),
            "tpot_p50": _quantile(tpot, 50), "tpot_p95": _quantile(tpot, 95)}


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def _idle_phases(url: str, wait_s: float = 5.0) -> dict:
    """The worker's phases (server.Worker.phases) once it is idle: a reply's last chunk reaches its client before
    the worker adds that pass's time, which a read at once would leave to the next level."""
    end = time.perf_counter() + wait_s
    body = _health(url)
    while (body.get("running") or body.get("waiting")) and time.perf_counter() < end:
        time.sleep(0.005)
        body = _health(url)
    return body.get("phases") or {}


def server_configs(heads: str | None, max_batch: int, lookup: bool | None) -> dict[str, list[str]]:
    """`draftheads serve` arguments per configuration measured. lookup (--lookup / --no-lookup) goes to the heads
    servers, as it would to `serve`; the plain ones never draft (--no-lookup whatever the default)."""
    plain = ["--heads", "none", "--no-lookup"]
    if heads in (None, "none"):
        return {"plain, batched": [*plain, "--max-batch", str(max_batch)], "plain, serial": [*plain, "--max-batch", "1"]}
    drafting = ["--heads", heads] + ([] if lookup is None else ["--lookup" if lookup else "--no-lookup"])
    return {"heads, batched": [*drafting, "--max-batch", str(max_batch)],
            "plain, batched": [*plain, "--max-batch", str(max_batch)],
            "heads, serial": [*drafting, "--max-batch", "1"]}


def run_concurrency(args) -> dict:
    from .questions import load_questions

    levels = args.concurrency
    n = max(levels) * args.requests_per_client
    prompts = list(enumerate(q.turns[0] for q in load_questions(args.questions, n)))
    model_args = ["--threads", str(args.threads)]
    for flag, value in (("--backbone", args.backbone), ("--engine", args.engine), ("--device", args.device),
                        ("--dtype", args.dtype), ("--tree", args.tree)):
        if value is not None:
            model_args += [flag, value]
    configs = server_configs(args.heads, args.max_batch, args.lookup)
    report = {"questions": args.questions, "prompts": len(prompts), "max_tokens": args.max_new_tokens,
              "max_batch": args.max_batch, "threads": args.threads, "configs": {}}
    from .calibrate import machine

    # Every server runs at once, idle but for the one being measured, and the configurations take turns at
    # each level: a shared machine's slow minutes then fall on all of them, not on whichever ran last.
    servers = {}
    try:
        for name, extra in configs.items():
            servers[name] = start_server(model_args, extra)
            ask(servers[name][1], "Say hi.", 8)  # warm-up
            report["configs"][name] = {"args": extra, "levels": [], "texts": {}}
        # Each level runs in two halves, the servers in one order and then in the reverse (A B C, C B A), so
        # that a machine slowing down or speeding up during the level weighs on every server alike. One
        # client takes turns per request: its requests run one after another anyway (no batch fills or
        # drains between them), and a half of it spans ~40 s, long enough for this machine to drift.
        cut = len(prompts) // 2 if len(prompts) // 2 >= max(levels) else len(prompts)
        halves = [h for h in (prompts[:cut], prompts[cut:]) if h]
        for c in levels:
            served = {name: [0.0, [], {}, [0.0, 0.0]] for name in servers}  # wall, results, phases, full load
            for k, half in enumerate([[p] for p in prompts] if c == 1 else halves):
                for name, (_, url) in (list(servers.items()) if k % 2 == 0 else list(servers.items())[::-1]):
                    before = _idle_phases(url)
                    wall, results = load_level(url, half, c, args.max_new_tokens)
                    # the worker's time per phase during this level (server.Worker.phases)
                    after = _idle_phases(url)
                    acc = served[name]
                    acc[0] += wall
                    acc[1] += results
                    acc[2] = {key: acc[2].get(key, 0) + after[key] - before.get(key, 0) for key in after}
                    acc[3] = [x + y for x, y in zip(acc[3], full_load(results))]
            for name, (wall, results, phases, (full_tokens, full_s)) in served.items():
                row = level_row(c, wall, results)
                row["phases"] = phases or None
                # tokens/s while every client was still sending (full_load): the level without its drain
                row["full_load_tokens_per_s"] = full_tokens / full_s if full_s > 0 else None
                report["configs"][name]["texts"][c] = {r["index"]: r["text"] for r in results}
                report["configs"][name]["levels"].append(row)
                print(f"{name}, {c} clients: {row['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
        for name, (_, url) in servers.items():  # measured tokens/s per batch size, trees and plain (round_costs.py)
            health = _health(url)
            report["configs"][name]["batched_rounds"] = health.get("batched_rounds")
            report["configs"][name]["prompt_cache"] = health.get("prompt_cache")  # kvcache.PromptCache's counts
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(30)
    serial = next(cfg for name, cfg in report["configs"].items() if name.endswith("serial"))
    alone = serial["texts"][min(levels)] if min(levels) == 1 else None
    for cfg in report["configs"].values():
        cfg["differ_from_alone"] = ({c: sum(t[i] != alone[i] for i in t) for c, t in cfg["texts"].items()}
                                    if alone is not None else None)
    report["machine"] = machine()
    return report


def write_report(report: dict, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["Servers: " + "; ".join(f"{name} `{' '.join(cfg['args'])}`" for name, cfg in report["configs"].items()), "",
             "| config | clients | tokens/s | at full load | TTFT p50 / p95 s | per-token p50 / p95 ms | differ from alone |",
             "|---|---|---|---|---|---|---|"]
    for name, cfg in report["configs"].items():
        for row in cfg["levels"]:
            d = (cfg["differ_from_alone"] or {}).get(row["clients"], "n/a")
            full = row.get("full_load_tokens_per_s")
            lines.append(f"| {name} | {row['clients']} | {row['tokens_per_s']:.1f} | "
                         f"{'n/a' if full is None else f'{full:.1f}'} | {row['ttft_p50']:.2f} / "
                         f"{row['ttft_p95']:.2f} | {1000 * row['tpot_p50']:.0f} / {1000 * row['tpot_p95']:.0f} | {d} |")
    for name, cfg in report["configs"].items():
        if cfg.get("batched_rounds"):
            lines += ["", f"{name}, the rounds it served (the tree decision per batch size, round_costs.py):", "",
                      "| sequences | rounds (with trees) | pairs | trees over plain, recent pairs (the decision) | "
                      "tokens/s with trees / plain, all rounds |", "|---|---|---|---|---|"]
            lines += [f"| {b} | {r['rounds']} ({r['trees_rounds']}) | {r['pairs']} | {r['trees_over_plain']:.2f} | "
                      f"{r['trees']:.1f} / {r['plain']:.1f} |" for b, r in cfg["batched_rounds"].items()]
    cached = [(name, cfg["prompt_cache"]) for name, cfg in report["configs"].items() if cfg.get("prompt_cache")]
    if cached:
        lines += ["", "Prompts that started as a recent one (kvcache.PromptCache; every request, the warm-up's included):", ""]
        lines += [f"- {name}: {c['hits']} of {c['prompts']} prompts, {c['tokens_reused']} of {c['tokens']} prompt tokens "
                  "from the cache" for name, c in cached]
    phased = [(name, row) for name, cfg in report["configs"].items() for row in cfg["levels"] if row.get("phases")]
    if phased:
        lines += ["", "Where the workers' time went per level (server.Worker.phases; seconds; the serial worker "
                  "makes a step's text inside its pass, the batched ones in the hand-out):", "",
                  "| config | clients | wall | admit (prefill) | verify passes | hand-out | passes | sequences per pass |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {row['clients']} | {row['wall_s']:.1f} | {ph['admit_s']:.1f} | {ph['passes_s']:.1f} | "
                  f"{ph['advance_s']:.1f} | {ph['passes']} | {ph['sequences'] / max(ph['passes'], 1):.2f} |"
                  for name, row in phased for ph in [row["phases"]]]
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
    ax.set_xticks([r["clients"] for r in next(iter(report["configs"].values()))["levels"]])
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "concurrency.png", dpi=120)
    plt.close(fig)
    return lines


def cmd_bench_concurrency(args) -> None:
    if args.max_batch < 2:
        raise UserError("--max-batch must be at least 2 for the batched servers")
    output_dir(args.out, "--out")
    report = run_concurrency(args)
    lines = write_report(report, Path(args.out))
    print("\n".join(lines))
    print(f"wrote {args.out}/report.json, report.md, concurrency.png", file=sys.stderr)
