"""Are the heads' probabilities calibrated? Head 1's top-token probability against whether that token is
the backbone's own (teacher-forced on its greedy replies), by threshold: the share of positions at or above
it and how often head 1 is right there and below. What --draft-confidence relies on (batch.py).

    python scripts/head_confidence.py --prompts runs/default/calib_prompts.jsonl --dtype bfloat16

Use prompts that are neither training nor evaluation data (calibrate's own, scripts/unused_prompts.py).
"""

from __future__ import annotations

import argparse

import torch

import draftheads
from draftheads.train.prompts import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, action="append", help="a prompts file; repeat")
    ap.add_argument("--heads", default="default")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = draftheads.load(heads=a.heads, dtype=a.dtype, lookup=False)
    probs, right = [], []
    for prompt in [p for f in a.prompts for p in load_prompts(f)]:
        ids = m.prompt_ids(prompt)
        seq = ids + m.generate(prompt, max_new_tokens=a.max_new_tokens).token_ids
        with torch.inference_mode():
            hidden = m.decoder.engine.hidden_states(torch.tensor(seq))  # [T, H]
            top = m.heads(hidden, 1)[0].float().softmax(-1).max(-1)  # head 1 at every position
        guess = m.heads.to_full_ids(top.indices)
        for t in range(len(ids) - 1, len(seq) - 2):  # hidden at t: the root is seq[t+1], head 1 guesses seq[t+2]
            probs.append(float(top.values[t]))
            right.append(int(guess[t]) == seq[t + 2])
    p, r = torch.tensor(probs), torch.tensor(right, dtype=torch.float)
    print(f"{len(p)} positions; head 1 right at {r.mean():.3f} of them")
    print("| threshold | positions at or above | right there | right below |")
    print("|---|---|---|---|")
    for tau in (0.1, 0.2, 0.3, 0.5, 0.7):
        k = p >= tau
        below = f"{r[~k].mean():.2f}" if (~k).any() else "-"
        print(f"| {tau} | {k.float().mean():.2f} | {r[k].mean():.2f} | {below} |")


if __name__ == "__main__":
    main()
