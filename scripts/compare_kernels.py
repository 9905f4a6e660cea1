"""The few-row C++ kernel (few_rows.py) against the kernels before it (F.linear and the padded product, as
cpu_matmul.routes() chose between them), on whole decodes: chat-formatted questions decoded greedily one
at a time, our loop without heads and with the default heads, under each kernel routing in one process
(the routings alternate per question; both routings are measured at start-up, as routes() measures).
With --packed: the C++ kernel on float32 weights against the same kernel taking the weights from their
GGUF blocks (few_rows.packed_linear, as routes() takes it where it measured it faster). With --layer-ops:
the routing routes() chose, with torch's small ops between the products against the C++ layer ops
(layer_ops.py). With --prefill: the packed kernel up to MAX_ROWS rows (prompts of more new tokens prefilled on
MKL, as before stop 43) against up to cpu_matmul.packed_rows() (as measured here).

Prints tokens/s and mean prefill ms per (routing, method), replies that differ between the routings (fp32
rounding moves with the kernel) and, per routing, replies where the heads differ
from the loop (must be 0).

    python scripts/compare_kernels.py --questions vicuna --limit 20 --max-new-tokens 128 [--packed | --layer-ops | --prefill]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import draftheads
from draftheads import cpu_matmul, layer_ops
from draftheads.questions import load_questions, question_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default="vicuna")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--packed", action="store_true", help="float32 weights against their GGUF blocks, both on the C++ kernel")
    ap.add_argument("--layer-ops", action="store_true", help="torch's small ops against the C++ layer ops, same kernels")
    ap.add_argument("--prefill", action="store_true", help="prefills over MAX_ROWS rows on MKL against the packed kernel")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.prefill:
        table, most = cpu_matmul.routes(), cpu_matmul.packed_rows()
        assert most > cpu_matmul.MAX_ROWS, f"the packed kernel takes no prefill here (packed_rows() = {most})"
        routings = {"prefill on MKL": (table, cpu_matmul.MAX_ROWS, True), f"prefill packed (<= {most} rows)": (table, most, True)}
    elif a.layer_ops:
        table, packed = cpu_matmul.routes(), cpu_matmul.packed_rows()
        routings = {"torch's ops": (table, packed, False), "C++ layer ops": (table, packed, True)}
    elif a.packed:
        table = cpu_matmul.measure(a.threads)
        routings = {"float32 weights": (table, 0, True), "GGUF blocks": (table, cpu_matmul.MAX_ROWS, True)}
    else:
        routings = {"before (F.linear, padded)": (cpu_matmul.measure(a.threads, kernels=("padded",)), 0, True),
                    "with the C++ kernel": (cpu_matmul.measure(a.threads), 0, True)}
    for name, (r, packed, _) in routings.items():
        print(f"{name}: " + ", ".join(f"{k} {sorted(n for n, v in r.items() if v == k)}" for k in cpu_matmul.KERNELS)
              + ("; GGUF blocks where the weights are" if packed else ""))
    models = {"loop": draftheads.load(heads=None), "heads": draftheads.load(heads="default")}
    tokens = {(r, m): 0 for r in routings for m in models}
    seconds, prefill = dict.fromkeys(tokens, 0.0), {k: [] for k in tokens}
    replies = {k: [] for k in tokens}
    for k, q in enumerate(load_questions(question_file(a.questions), a.limit)):
        chat = [{"role": "user", "content": q.turns[0]}]
        for name in (list(routings) if k % 2 == 0 else list(reversed(routings))):
            cpu_matmul._ROUTES[a.threads], cpu_matmul._PACKED_ROWS[a.threads], layer_ops.ENABLED = routings[name]
            for method, m in models.items():
                res = m.generate(chat, max_new_tokens=a.max_new_tokens)
                tokens[name, method] += res.stats.new_tokens
                seconds[name, method] += res.stats.total_s
                prefill[name, method].append(res.stats.prefill_s * 1e3)
                replies[name, method].append(res.token_ids)
        print(f"question {k + 1} done", flush=True)
    first, second = routings
    print("\n| kernels | method | tokens/s | prefill ms (mean) |\n|---|---|---:|---:|")
    for (name, method), n in tokens.items():
        print(f"| {name} | {method} | {n / seconds[name, method]:.1f} | {statistics.mean(prefill[name, method]):.1f} |")
    for method in models:
        print(f"{method}: tokens/s {second} over {first}: "
              f"{tokens[second, method] / seconds[second, method] / (tokens[first, method] / seconds[first, method]):.3f}x; "
              f"replies that differ between the routings: {sum(x != y for x, y in zip(replies[first, method], replies[second, method]))}")
    for name in routings:
        diff = sum(x != y for x, y in zip(replies[name, "loop"], replies[name, "heads"]))
        ratio = tokens[name, "heads"] / seconds[name, "heads"] / (tokens[name, "loop"] / seconds[name, "loop"])
        print(f"{name}: heads over loop {ratio:.3f}x; replies where the heads differ from the loop: {diff}")


if __name__ == "__main__":
    main()
