"""Is speculative greedy decoding still identical to plain greedy decoding in bfloat16 on this CPU?

Two measurements (docs/verify_profile.md, "bfloat16 on a CPU"):
1. Row invariance of the stock product (F.linear): each row of an n-row product against the same row
   multiplied alone (1 row) and alone but padded to 2 rows (what the loop does in bf16 on a CPU), on
   the default model's real weights and real activations (layer 0's input norm over a vicuna prompt).
   Fraction of output elements that differ.
2. Greedy replies of our own loop without heads and with the shipped heads (their calibrated tree, or
   --tree), in each dtype, on the first --limit vicuna questions: how many differ, the first differing
   token, and the mean accepted tokens per step. On a CPU bf16 runs row-exact verify; on CUDA stock kernels.

    .venv/bin/python scripts/bf16_exactness.py [--limit 10] [--max-new-tokens 128] [--threads 2] [--tree T] \
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import draftheads
from draftheads.llama_forward import rms_norm
from draftheads.questions import load_questions


def row_invariance(dtype: str, prompt: str, device: str) -> dict[str, list[float]]:
    dm = draftheads.load(heads=None, dtype=dtype, device=device)
    model = dm.backbone
    layer = model.model.layers[0]
    ids = torch.tensor(dm.prompt_ids(prompt), device=device)[:16]
    with torch.inference_mode():
        x = rms_norm(model.model.embed_tokens(ids), layer.input_layernorm)  # [16, 576] real activations
        out = {}
        for name, w in (("q_proj", layer.self_attn.q_proj.weight), ("gate_proj", layer.mlp.gate_proj.weight),
                        ("lm_head", model.lm_head.weight)):
            alone = torch.cat([F.linear(x[r:r + 1], w) for r in range(16)])
            two = torch.cat([F.linear(torch.cat([x[r:r + 1], torch.zeros_like(x[:1])]), w)[:1] for r in range(16)])
            out[name] = [((F.linear(x[:n], w) != alone[:n]).float().mean().item(),
                          (F.linear(x[:n], w) != two[:n]).float().mean().item()) for n in (2, 4, 8, 16)]
    return out


def replies(dtype: str, questions, max_new: int, device: str, tree) -> tuple[int, list[int], float]:
    plain = draftheads.load(heads=None, dtype=dtype, device=device)
    spec = draftheads.load(heads="default", dtype=dtype, device=device, tree=tree, lookup=False)
    first, accepted = [], []
    for q in questions:
        a = plain.generate(q.turns[0], max_new_tokens=max_new).token_ids
        r = spec.generate(q.turns[0], max_new_tokens=max_new)
        b = r.token_ids
        accepted += r.stats.accepted
        if a != b:
            first.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    return len(first), first, sum(accepted) / max(1, len(accepted))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tree", default=None, help="default: the heads' calibrated tree")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    questions = load_questions("vicuna", args.limit)
    for dtype in ("float32", "bfloat16"):
        print(f"## {dtype}\n\nrows of an n-row product that differ from the row alone (1 row | padded to 2 rows):")
        for name, fracs in row_invariance(dtype, questions[0].turns[0], args.device).items():
            print(f"- {name}: " + ", ".join(f"n={n}: {a:.3f} | {b:.3f}" for n, (a, b) in zip((2, 4, 8, 16), fracs)))
        n, first, acc = replies(dtype, questions, args.max_new_tokens, args.device, args.tree)
        print(f"\ngreedy replies, heads vs no heads: {n} of {len(questions)} differ (first differing token: {first}); "
              f"mean accepted {acc:.2f}\n", flush=True)


if __name__ == "__main__":
    main()
