"""How much a rounding setting changes the default model's next-token predictions: int8 activations (README,
--activations; `--setting activations`, the default) or the float16 KV cache (--kv-cache; `--setting kv-cache`),
each against float32. Over the backbone's own greedy replies (records of a distilled set, whose ids are prompt +
the reply it produced with float32 activations and cache), teacher-forced, the logits at every reply position in
both modes. Reports top-1 agreement, the mean KL(float32 || other), the share of positions where the two top-1s
differ while float32's top-2 margin exceeds 0.5, and each mode's agreement with the recorded reply token. Then, as
a measure of quality that favours neither mode, each mode's mean negative log-likelihood of human-written answers
(`--human`: a JSONL of {"question", "answer"}, GSM8K's training split by default) after their question, and the
difference's standard error paired over answers. The other setting stays at its default.

    .venv/bin/python scripts/activation_agreement.py [--setting activations|kv-cache] [--data data/distilled]
        [--records 40] [--human ../shared/data/gsm8k_train.jsonl] [--human-records 40] [--threads 2]

Passes of up to 64 tokens, so every product runs on the packed kernel (cpu_matmul.packed_rows() is 64-128 here).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from draftheads import few_rows, kvcache
from draftheads.backbone import chat_ids, load_backbone
from draftheads.generate import Decoder
from draftheads.train.shards import iter_shards

CHUNK = 64
# setting -> (its setter, (the float32 kind, the other))
SETTINGS = {"activations": (few_rows.set_activations, ("float32", "int8")),
            "kv-cache": (kvcache.set_kv_cache, ("float32", "float16"))}


def reply_logits(dec: Decoder, ids: list[int], start: int) -> torch.Tensor:
    """Logits [len(ids) - start, vocab] predicting ids[start:] (float32), the sequence prefilled in chunks."""
    cache = dec.engine.new_cache(len(ids))  # in the current --kv-cache setting
    out = []
    for a in range(0, len(ids) - 1, CHUNK):
        chunk = torch.tensor(ids[a:min(a + CHUNK, len(ids) - 1)])
        n = chunk.numel()
        causal = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
        h = dec.engine._forward(cache, chunk, torch.arange(a, a + n), causal)  # [n, hidden]
        out.append(dec.logits(h).float())
    return torch.cat(out)[start - 1:]  # position p predicts ids[p + 1]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", choices=SETTINGS, default="activations")
    ap.add_argument("--data", default="data/distilled")
    ap.add_argument("--records", type=int, default=40)
    ap.add_argument("--human", default="../shared/data/gsm8k_train.jsonl")
    ap.add_argument("--human-records", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_backbone()
    dec = Decoder(backbone.model)
    records = next(iter(iter_shards(args.data, features=False)))[1][:args.records]
    n = agree = kl = confident_flips = 0
    set_kind, (exact, other) = SETTINGS[args.setting]
    matches = {exact: 0, other: 0}
    for rec in records:
        ids, start = rec["ids"], rec["prompt_len"]
        logits = {}
        for kind in matches:
            set_kind(kind)
            logits[kind] = reply_logits(dec, ids, start)  # [reply, vocab]
            matches[kind] += (logits[kind].argmax(-1) == torch.tensor(ids[start:])).sum().item()
        f, q = logits[exact], logits[other]
        top2 = f.topk(2, -1).values
        flip = f.argmax(-1) != q.argmax(-1)
        n += f.shape[0]
        agree += (~flip).sum().item()
        confident_flips += (flip & (top2[:, 0] - top2[:, 1] > 0.5)).sum().item()
        kl += torch.nn.functional.kl_div(q.log_softmax(-1), f.log_softmax(-1), log_target=True, reduction="sum").item()
    nll, tokens, diffs = {exact: 0.0, other: 0.0}, 0, []  # diffs: per answer, other's summed NLL minus exact's
    with open(args.human) as f:
        pairs = [json.loads(line) for _, line in zip(range(args.human_records), f)]
    for pair in pairs:
        prompt = chat_ids(backbone.tokenizer, pair["question"])
        answer = backbone.tokenizer.encode(pair["answer"], add_special_tokens=False)
        one = {}
        for kind in nll:
            set_kind(kind)
            logits = reply_logits(dec, prompt + answer, len(prompt))  # [answer, vocab]
            one[kind] = torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum").item()
            nll[kind] += one[kind]
        tokens += len(answer)
        diffs.append(one[other] - one[exact])
    # the per-token difference's standard error, paired over answers (each answer's sum is one sample)
    se = statistics.stdev(diffs) * len(diffs) ** 0.5 / tokens if len(diffs) > 1 else float("nan")
    print(json.dumps({"setting": args.setting, "records": len(records), "positions": n, "top1_agreement": agree / n,
                      f"mean_kl_{exact}_{other}": kl / n,
                      "flips_with_float32_margin_over_0.5": confident_flips / n,
                      "reply_token_agreement": {k: v / n for k, v in matches.items()},
                      "human_answers": {"file": args.human, "answers": len(pairs), "tokens": tokens,
                                        "mean_nll": {k: v / tokens for k, v in nll.items()},
                                        f"nll_{other}_minus_{exact}": sum(diffs) / tokens, "paired_standard_error": se}},
                     indent=1))


if __name__ == "__main__":
    main()
