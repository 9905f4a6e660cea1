"""Distillation throughput, one process, same prompts: transformers' `generate` path against the
batched engine (train/batch_generate.py), and end to end with the hidden states the heads train on
(generate + a feature pass over the conversations, against the engine that keeps them as it goes).

    .venv/bin/python scripts/bench_distill.py ../shared/data/gpteacher_codegen_instruct.json --num 96 \
        --batch-size 48 --slots 128 --max-new-tokens 192 --threads 2

Tokens/s counts generated tokens (the end token included). Run it on a quiet machine: each method
holds every core it is given.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from draftheads.acceptance import SamplingConfig
from draftheads.backbone import load_backbone
from draftheads.train.batch_generate import BatchGenerator, Request
from draftheads.train.data import tokenize_conversation
from draftheads.train.distill import _eos_ids, generate_batch, render
from draftheads.train.prompts import load_prompts
from draftheads.train.trainer import backbone_hidden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", help="a training prompt file (never an evaluation file)")
    ap.add_argument("--num", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=48, help="rows per transformers generate call")
    ap.add_argument("--slots", default="48,128", help="slots of the batched engine (comma-separated: one run each)")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--max-prompt-tokens", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bb = load_backbone(None)
    model, tok = bb.model, bb.tokenizer
    tok.pad_token = tok.pad_token or tok.eos_token
    eos = _eos_ids(model, tok)
    prompts = load_prompts(args.prompts)
    texts = [render(tok, [{"role": "user", "content": p}]) for p in prompts]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    keep = [i for i, x in enumerate(ids) if len(x) <= args.max_prompt_tokens][:args.num]
    prompts, texts, ids = [prompts[i] for i in keep], [texts[i] for i in keep], [ids[i] for i in keep]

    # transformers generate, left-padded batches of similar lengths (the old distill path), then the
    # feature pass the trainer ran over the resulting conversations.
    t0 = time.perf_counter()
    answers = []
    for b in range(0, len(texts), args.batch_size):
        answers += generate_batch(model, tok, texts[b:b + args.batch_size], args.max_new_tokens, 0.0, 1.0, eos)
    gen_s = time.perf_counter() - t0
    gen_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + ended for a, ended in answers)
    seqs = [tokenize_conversation(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": a}], 4096)[0]
            for p, (a, _) in zip(prompts, answers)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].shape[0])
        for b in range(0, len(order), 8):
            backbone_hidden(model, [seqs[i] for i in order[b:b + 8]], model.device)
    feat_s = time.perf_counter() - t0

    res = {"prompts": len(ids), "threads": args.threads, "batch_size": args.batch_size,
           "max_new_tokens": args.max_new_tokens,
           "generate": {"tokens": gen_tokens, "seconds": gen_s, "tokens_per_s": gen_tokens / gen_s},
           "generate_plus_features": {"seconds": gen_s + feat_s, "tokens_per_s": gen_tokens / (gen_s + feat_s)},
           "engine_with_hidden": {}}
    # the batched engine, hidden states kept
    for slots in [int(x) for x in args.slots.split(",")]:
        queue = [Request(x, args.max_new_tokens, SamplingConfig(), keep_hidden=True) for x in ids]
        engine = BatchGenerator(model, slots, args.max_prompt_tokens + args.max_new_tokens, eos)
        t0 = time.perf_counter()
        eng_tokens = sum(len(f.new_ids) for f in engine.run(lambda: queue.pop(0) if queue else None))
        eng_s = time.perf_counter() - t0
        tps = eng_tokens / eng_s
        res["engine_with_hidden"][slots] = {
            "tokens": eng_tokens, "seconds": eng_s, "tokens_per_s": tps,
            "speedup_generation": tps / res["generate"]["tokens_per_s"],
            "speedup_end_to_end": tps / res["generate_plus_features"]["tokens_per_s"]}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
