"""What VocabTrim costs and saves for a heads directory trained with --trim-vocab:

- speed: median draft time per step (the heads' forward + top-k) of the trimmed heads and of the same
  heads with a full-vocabulary LM head each (same architecture, untrained weights: time does not
  depend on the values), and one backbone 1-token step for scale;
- accuracy ceiling: the share of the backbone's greedy output tokens on held-out prompts that lie
  inside the kept vocabulary. A head can never draft a token outside it, so this bounds what
  trimming can cost in accuracy (held-out top-1 per head is in the training run's eval.json).

    .venv/bin/python scripts/vocabtrim_compare.py --heads src/draftheads/default_heads \
        --prompts vicuna --limit 10 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import draftheads
from draftheads.heads.medusa import MedusaHeads
from draftheads.questions import load_questions
from profile_verify import median_ms  # scripts/ is on sys.path when a script in it runs


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="default")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dm = draftheads.load(heads=a.heads, lookup=False)
    heads, model = dm.heads, dm.backbone
    assert heads.vocab_map is not None, "these heads are not trimmed"
    full_cfg = copy.deepcopy(heads.cfg)
    full_cfg.trimmed_vocab = None
    full = MedusaHeads(full_cfg).to(model.dtype).attach(model).eval()

    hidden = torch.randn(heads.cfg.hidden_size)
    root = torch.tensor(0)
    trimmed_ms = median_ms(lambda: heads.draft(hidden, root, dm.tree), 30)
    full_ms = median_ms(lambda: full.draft(hidden, root, dm.tree), 30)
    ids = torch.tensor([[1]])
    step_ms = median_ms(lambda: model(ids), repeats=10)  # no cache: one token, for scale only

    inside = total = 0
    keep = torch.zeros(heads.cfg.vocab_size, dtype=torch.bool)
    keep[heads.vocab_map] = True
    for q in load_questions(a.prompts, a.limit):
        out = dm.generate(q.turns[0], max_new_tokens=a.max_new_tokens).token_ids
        inside += int(keep[torch.tensor(out, dtype=torch.long)].sum())
        total += len(out)
    print(json.dumps({
        "heads": str(a.heads), "kept_vocab": int(heads.vocab_map.shape[0]), "full_vocab": heads.cfg.vocab_size,
        "threads": torch.get_num_threads(), "tree_size": dm.tree.size,
        "draft_ms_trimmed": round(trimmed_ms, 2), "draft_ms_full_vocab": round(full_ms, 2),
        "backbone_one_token_forward_ms": round(step_ms, 1),
        "heldout_output_tokens": total, "heldout_coverage": round(inside / max(total, 1), 4),
    }, indent=1))


if __name__ == "__main__":
    main()
