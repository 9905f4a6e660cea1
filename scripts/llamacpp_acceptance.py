"""How much the heads lose when they draft from llama.cpp's hidden states (Q4_1 weights, activations
quantised to 8 bits in its matmuls, an fp16 KV cache) instead of the fp32 PyTorch backbone's they were
trained on. Accuracy only, no timing: it runs on a busy machine too.

On the same sequences (each prompt + the fp32 backbone's greedy continuation) both engines give hidden
states for every position; the heads draft from each. Reported: how close the hidden states are
(cosine, relative error), each head's top-1 agreement between the two engines, each head's accuracy
(conditional, rank 0 and within the top 10, as `calibrate` measures it) from each engine's states, and
the mean accepted tokens per step of live greedy decoding with the heads' tree on each engine.

    .venv/bin/python scripts/llamacpp_acceptance.py [--prompts vicuna] [--limit 20] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="vicuna", help="question set or prompt file (as bench's)")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--heads", default="default")
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    import draftheads
    from draftheads.calibrate import accuracies, head_ranks
    from draftheads.questions import load_questions

    engines = {"torch": draftheads.load(heads=args.heads, engine="torch", lookup=False),
               "llama.cpp": draftheads.load(heads=args.heads, engine="llama.cpp", lookup=False)}
    ref, heads = engines["torch"], engines["torch"].heads
    prompts = [ref.prompt_ids(q.turns[0]) for q in load_questions(args.prompts, args.limit)]
    ranks = {name: [] for name in engines}
    cos, rel, agree, accepted = [], [], [], {name: [] for name in engines}
    with torch.inference_mode():
        for ids in prompts:
            cont = ref.generate(torch.tensor(ids), max_new_tokens=args.max_new_tokens).token_ids
            seq = torch.tensor(ids + cont)
            h = {name: dm.decoder.engine.hidden_states(seq).float() for name, dm in engines.items()}  # [T, H]
            cos.append(torch.nn.functional.cosine_similarity(h["torch"], h["llama.cpp"], dim=-1))
            rel.append((h["torch"] - h["llama.cpp"]).norm(dim=-1) / h["torch"].norm(dim=-1))
            top = {name: heads.teacher_topk(x, seq, 1)[..., 0] for name, x in h.items()}  # [K, T]
            agree.append((top["torch"] == top["llama.cpp"]).float())
            for name, dm in engines.items():
                ranks[name].append(head_ranks(dm, ids, cont))
                accepted[name] += dm.generate(torch.tensor(ids), max_new_tokens=args.max_new_tokens).stats.accepted
    result = {"prompts": len(prompts), "positions": int(sum(x.numel() for x in cos)),
              "hidden_cosine_mean": float(torch.cat(cos).mean()), "hidden_cosine_min": float(torch.cat(cos).min()),
              "hidden_relative_error_mean": float(torch.cat(rel).mean()),
              "head_top1_agreement": torch.cat(agree, dim=1).mean(dim=1).tolist(),
              "tree": ref.tree.to_json() if ref.tree else None}
    for name in engines:
        p, _ = accuracies(torch.cat(ranks[name]))
        result[name] = {"accuracy_rank0": [row[0] for row in p], "accuracy_top10": [sum(row) for row in p],
                        "mean_accepted_per_step": sum(accepted[name]) / max(len(accepted[name]), 1)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
