"""`draftheads compare`: what Medusa-2's adapter costs in faithfulness to the original model and what
it buys in speed, on held-out prompts, side by side, in one process.

Per prompt (greedy, batch 1), methods interleaved in an order rotated per prompt:
- `original`: the original backbone in our loop without heads; its reply O;
- `original + medusa1` (with --medusa1-heads): the original with Medusa-1 heads (lossless: reply O);
- `tuned + medusa2`: the backbone with the Medusa-2 adapter merged, with its heads; its reply U.
Then, teacher-forced on prompt + O, the tuned model's top-1 token is compared with the original's at
every position of O (top-1 agreement; 100% means the tuned model would have written O token by
token), and the original scores U: its perplexity on the tuned model's replies, beside its perplexity
on its own. Multi-turn questions continue with the original's reply as history for every method.

Medusa-2 is not lossless with respect to the original model: where agreement is below 100%, replies
can differ. Two copies of the backbone are in memory (original and tuned).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .backbone import Backbone, chat_ids, load_backbone
from .draftmodel import DraftModel, heads_dir, load, safe_tree
from .errors import UserError, output_dir
from .heads import load_heads
from .heads.checkpoint import read_config
from .questions import load_questions
from .tree import load_tree

ORIGINAL, MEDUSA1, MEDUSA2 = "original", "original + medusa1", "tuned + medusa2"


@torch.inference_mode()
def next_token_logits(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """Logits [len(reply), vocab] of the positions that predict each reply token, teacher-forced."""
    x = torch.tensor([prompt + reply], device=model.device)
    return model(input_ids=x).logits[0, len(prompt) - 1:len(prompt) + len(reply) - 1].float()


def _nll(logits: torch.Tensor, tokens: list[int]) -> float:
    t = torch.tensor(tokens, device=logits.device)
    return float(-logits.log_softmax(-1).gather(1, t[:, None]).sum())


def _sync(device) -> float:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def build_models(args) -> dict[str, DraftModel]:
    """The methods, the original backbone loaded once for the first two; the tuned one is its own copy."""
    source = heads_dir(args.heads)
    raw = read_config(source)
    if not raw.get("adapter") and not raw.get("tuned_fingerprint"):
        raise UserError(f"{source} are not Medusa-2 heads (no adapter): they leave the backbone as it is, so there "
                        "is nothing to compare; `draftheads bench` measures their speed")
    # the heads alone, as Medusa-1's below: lookup's branches would ride on one side of the comparison only
    tuned = load(heads=source, backbone=args.backbone, device=args.device, dtype=args.dtype, tree=args.tree, lookup=False)
    original = load_backbone(args.backbone or raw.get("backbone") or None, device=args.device, dtype=args.dtype)
    models = {ORIGINAL: DraftModel(original, None, None)}
    if args.medusa1_heads:
        m1 = heads_dir(args.medusa1_heads)
        heads = load_heads(m1, original.model).to(device=original.model.device, dtype=original.model.dtype)
        heads.attach(original.model).eval()
        K = heads.cfg.num_heads
        tree = load_tree(args.tree or heads.cfg.tree, K) if (args.tree or heads.cfg.tree) else safe_tree(args.device, K)
        models[MEDUSA1] = DraftModel(Backbone(original.model, original.tokenizer, original.name), heads, tree)
    models[MEDUSA2] = tuned
    return models


def run_compare(args) -> dict:
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    questions = load_questions(args.questions, args.limit)
    models = build_models(args)
    orig, tuned = models[ORIGINAL], models[MEDUSA2]
    tok, names = orig.tokenizer, list(models)
    first = chat_ids(tok, questions[0].turns[0])
    for dm in models.values():  # warm-up: the first calls pay for lazy initialisation
        dm.generate(torch.tensor(first), max_new_tokens=min(args.max_new_tokens, 16))
    rows, slot = [], 0
    for q in questions:
        history: list[dict] = []
        for turn, text in enumerate(q.turns):
            history.append({"role": "user", "content": text})
            ids = chat_ids(tok, history)
            res, secs = {}, {}
            for name in names[slot % len(names):] + names[:slot % len(names)]:
                t0 = _sync(args.device)
                res[name] = models[name].generate(torch.tensor(ids), max_new_tokens=args.max_new_tokens)
                secs[name] = _sync(args.device) - t0
            slot += 1
            O, U = res[ORIGINAL].token_ids, res[MEDUSA2].token_ids
            row = {"question_id": q.qid, "category": q.category, "turn": turn, "prompt_tokens": len(ids),
                   "same_reply": O == U,
                   "methods": {n: {"new_tokens": len(r.token_ids), "seconds": secs[n], "steps": r.stats.steps,
                                   "accepted": sum(r.stats.accepted)} for n, r in res.items()}}
            if O:
                lo, lt = next_token_logits(orig.backbone, ids, O), next_token_logits(tuned.backbone, ids, O)
                row.update(positions=len(O), agree=int((lo.argmax(-1) == lt.argmax(-1)).sum()), nll_original=_nll(lo, O))
            if U:
                row.update(tuned_tokens=len(U), nll_tuned=_nll(next_token_logits(orig.backbone, ids, U), U))
            rows.append(row)
            history.append({"role": "assistant", "content": tok.decode(O, skip_special_tokens=True)})
            print(f"compare: question {q.qid} turn {turn + 1}: " + ", ".join(
                f"{n} {row['methods'][n]['new_tokens'] / max(secs[n], 1e-9):.1f} tok/s" for n in names)
                + f", agreement {row.get('agree', 0)}/{row.get('positions', 0)}", flush=True)
    return _report(args, models, rows)


def _report(args, models, rows) -> dict:
    def total(key):
        return sum(r.get(key, 0) for r in rows)

    methods = {}
    for n in models:
        toks = sum(r["methods"][n]["new_tokens"] for r in rows)
        secs = sum(r["methods"][n]["seconds"] for r in rows)
        steps = sum(r["methods"][n]["steps"] for r in rows)
        methods[n] = {"tokens_per_s": toks / secs if secs else 0.0,
                      "mean_accepted": sum(r["methods"][n]["accepted"] for r in rows) / steps if steps else 0.0}
    base = methods[ORIGINAL]["tokens_per_s"]
    for m in methods.values():
        m["speedup"] = m["tokens_per_s"] / base if base else 0.0
    quality = {"agreement_top1": total("agree") / max(total("positions"), 1), "positions": total("positions"),
               "ppl_original_on_own": math.exp(total("nll_original") / max(total("positions"), 1)),
               "ppl_original_on_tuned": math.exp(total("nll_tuned") / max(total("tuned_tokens"), 1)),
               "same_replies": sum(r["same_reply"] for r in rows), "replies": len(rows)}
    rep = {"heads": str(args.heads), "medusa1_heads": args.medusa1_heads, "questions": args.questions,
           "max_new_tokens": args.max_new_tokens, "device": args.device, "methods": methods, "quality": quality,
           "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
    (out / "report.md").write_text(markdown(rep))
    return rep


def markdown(rep: dict) -> str:
    q = rep["quality"]
    lines = ["| method | tokens/s | speedup vs original | mean accepted / step | top-1 agreement with the original "
             "| original's perplexity on its replies |", "|---|---|---|---|---|---|"]
    for n, m in rep["methods"].items():
        tuned = n == MEDUSA2
        lines.append(f"| {n} | {m['tokens_per_s']:.1f} | {m['speedup']:.2f}x | {m['mean_accepted']:.2f} | "
                     f"{100 * q['agreement_top1']:.1f}% | {q['ppl_original_on_tuned']:.3f} |" if tuned else
                     f"| {n} | {m['tokens_per_s']:.1f} | {m['speedup']:.2f}x | {m['mean_accepted']:.2f} | 100% "
                     f"(lossless) | {q['ppl_original_on_own']:.3f} |")
    lines += ["", f"Agreement: teacher-forced on the original's greedy replies ({q['positions']} positions). Identical "
                  f"replies: {q['same_replies']} of {q['replies']}. Medusa-2 is not lossless with respect to the original "
                  "model: its replies are the tuned model's.", ""]
    return "\n".join(lines)


def cmd_compare(args) -> None:
    output_dir(args.out, "--out")
    rep = run_compare(args)
    print(markdown(rep), end="")
    print(f"wrote {Path(args.out) / 'report.json'} and report.md")
