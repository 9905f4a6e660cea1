"""`draftheads distill` and `draftheads train`: parse flags into the config dataclasses, call, print."""

from __future__ import annotations

import argparse

from .. import defaults
from ..cli import add_threads
from ..errors import at_least
from ..ngrams import MIN_COUNT as NGRAM_MIN_COUNT


def _source(spec: str):
    """`PATH` or `PATH:WEIGHT` (the weight is the part after the last colon when it is a number)."""
    from .distill import SourceSpec

    path, _, w = spec.rpartition(":")
    if path:
        try:
            return SourceSpec(path, float(w))
        except ValueError:
            pass
    return SourceSpec(spec, 1.0)


def distill_config(args):
    """The DistillConfig of `draftheads distill` arguments (also what a manifest's command rebuilds)."""
    from .distill import DistillConfig, GenerationConfig, SourceSpec

    sources = [_source(s) for s in args.prompts or []]
    if args.data_free:
        sources.append(SourceSpec(None, args.data_free))
    gen = GenerationConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           max_prompt_tokens=args.max_prompt_tokens, temperature=args.temperature, top_p=args.top_p,
                           second_turn=args.second_turn)
    return DistillConfig(output=args.output, sources=sources, num=args.num, prompt_field=args.field, seed=args.seed,
                         shard_size=args.shard_size, gen=gen)


def cmd_distill(args) -> None:
    import torch

    from ..acceptance import SamplingConfig
    from ..backbone import load_backbone
    from ..errors import output_dir, output_file
    from .distill import run
    from .shards import is_shard_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = distill_config(args)
    # Settings that would fail once the backbone has loaded and the output exists fail before both
    SamplingConfig(temperature=args.temperature, top_p=args.top_p, acceptance="exact" if args.temperature else "greedy")
    (output_dir if is_shard_dir(args.output) else output_file)(args.output, "--output")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    bb = load_backbone(args.backbone, device=args.device, dtype=args.dtype)
    import shlex
    import sys

    path = run(cfg, bb, progress=not args.no_progress, command=shlex.join(["draftheads"] + sys.argv[1:]))
    print(f"conversations: {path}")


def cmd_train(args) -> None:
    from .trainer import config_from_args, train

    import os

    out = train(config_from_args(args))
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under accelerate launch
        print(f"heads: {out}")


def cmd_ngrams(args) -> None:
    """Build the n-gram store of a heads directory from distilled directories of the same backbone."""
    import shlex
    import sys
    from pathlib import Path

    from ..backbone import fingerprints_match
    from ..errors import UserError
    from ..heads.checkpoint import read_config
    from ..ngrams import FILE, NgramStore
    from .shards import manifest_fingerprint, read_distilled

    heads = Path(args.heads).expanduser()
    cfg = read_config(heads)
    sequences, records = [], 0
    for d in args.data:
        if not (Path(d) / "manifest.json").is_file():
            raise UserError(f"{d} is not a distilled directory (no manifest.json): make one with draftheads distill -o DIR")
        fp = manifest_fingerprint(d)
        if not fp:  # as training does: a set that names no backbone is taken (drafts only; outputs stay exact)
            print(f"draftheads: note: {d}/manifest.json records no backbone fingerprint, so it is not checked against "
                  f"the heads' backbone", file=sys.stderr)
        elif cfg.get("backbone_fingerprint") and not fingerprints_match(cfg["backbone_fingerprint"], fp):
            raise UserError(f"{d} was distilled from another backbone than the heads in {heads} were trained on")
        recs = [r for r in read_distilled(d, features=False)[0] if r.get("ids") and "prompt_len" in r]
        records += len(recs)
        sequences += [(r["ids"], r["prompt_len"]) for r in recs]
    if not sequences:
        raise UserError(f"no records with token ids in {', '.join(args.data)}")
    store = NgramStore.build(sequences, cfg["vocab_size"], min_count=args.min_count)
    store.save(heads / FILE, {"data": args.data, "records": records, "min_count": args.min_count,
                              "backbone": cfg.get("backbone"), "backbone_fingerprint": cfg.get("backbone_fingerprint"),
                              "command": shlex.join(["draftheads"] + sys.argv[1:])})
    size = (heads / FILE).stat().st_size / 2**20
    print(f"n-gram store: {heads / FILE} ({store.entries:,} contexts of {records:,} replies, {size:.1f} MB)")


def cmd_compare(args) -> None:
    from ..compare import cmd_compare as run

    run(args)


def register(sub) -> None:
    d = sub.add_parser("distill", help="self-distillation: the backbone answers prompts -> conversations JSONL")
    d.add_argument("--prompts", action="append", metavar="PATH[:WEIGHT]",
                   help="prompt file (JSON list, JSONL or text, one prompt a line); repeatable; weight sets the mix")
    d.add_argument("--data-free", type=float, default=0.0, metavar="WEIGHT",
                   help="mix in prompts the backbone writes itself from the bare chat template (weight as for --prompts)")
    d.add_argument("--field", default=None, help="record field holding the prompt (default: auto-detect)")
    d.add_argument("--output", "-o", required=True,
                   help="a .jsonl file, or a directory of shards that also keeps hidden states (rerun to resume)")
    d.add_argument("--shard-size", type=at_least(1), default=500, help="records per shard (directory output)")
    d.add_argument("--num", type=at_least(1), default=None, help="total conversations (default: every file prompt)")
    d.add_argument("--backbone", default=None, help="HF model directory or cached name (default: embedded SmolLM2)")
    d.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    d.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    d.add_argument("--batch-size", type=at_least(1), default=16, help="prompts answered together (left-padded batch)")
    d.add_argument("--max-new-tokens", type=at_least(1), default=256, help="longest answer in tokens")
    d.add_argument("--max-prompt-tokens", type=at_least(1), default=512, help="longer prompts are skipped")
    d.add_argument("--temperature", type=float, default=0.0, help="answers: 0 greedy, above 0 sampled")
    d.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for the answers (1: off)")
    d.add_argument("--second-turn", action="store_true", help="the backbone writes a follow-up question and answers it")
    d.add_argument("--seed", type=int, default=0, help="seeds the source mix and sampling")
    add_threads(d)
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_distill)

    c = sub.add_parser("compare", help="Medusa-2 quality report: the tuned backbone against the original, and the "
                                       "speed gained, side by side",
                       description="Greedy replies of the original backbone, of the original with Medusa-1 heads "
                                   "(optional) and of the tuned backbone with its Medusa-2 heads: speed, top-1 agreement "
                                   "of the tuned model with the original (teacher-forced on the original's replies) and "
                                   "the original's perplexity on the tuned model's replies. Writes report.json/.md.")
    from ..bench_cli import QUESTIONS_HELP

    c.add_argument("questions", help="held-out prompts: " + QUESTIONS_HELP)
    c.add_argument("--heads", required=True, help="Medusa-2 heads directory (from train --method medusa2)")
    c.add_argument("--medusa1-heads", default=None,
                   help="Medusa-1 heads for the original backbone ('default' or a directory), timed beside")
    c.add_argument("--backbone", default=None, help="the ORIGINAL backbone (default: the one the heads name)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    c.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    c.add_argument("--tree", default=None, help="tree for both heads (default: each heads' calibrated tree, else a "
                                                "small one that is safe on the device)")
    c.add_argument("--limit", type=at_least(0), default=10, help="first N questions (0: all)")
    c.add_argument("--max-new-tokens", type=at_least(1), default=128, help="most new tokens per reply")
    c.add_argument("--out", default="compare-report", help="directory for report.json and report.md")
    add_threads(c)
    c.set_defaults(func=cmd_compare)

    t = sub.add_parser("train", help="train draft heads on distilled conversations (frozen backbone; medusa2: with a "
                                     "LoRA adapter on it)")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    n = sub.add_parser("ngrams", help="store the backbone's own n-grams (from distilled data) beside heads, for prompt "
                                      "lookup to draft from",
                       description="Count, in distilled replies, which token most often followed each context of 2-4 "
                                   "tokens; write the store to HEADS/ngrams.safetensors, which load() and every "
                                   "command then use with prompt lookup.")
    n.add_argument("--data", action="append", required=True, help="a distilled directory (draftheads distill -o DIR); "
                                                                  "repeatable")
    n.add_argument("--heads", required=True, help="the heads directory the store goes into (same backbone)")
    n.add_argument("--min-count", type=int, default=NGRAM_MIN_COUNT,
                   help="contexts seen fewer times are left out (a context seen once says little)")
    n.set_defaults(func=cmd_ngrams)


def add_train_args(t: argparse.ArgumentParser) -> None:
    """Flags map 1:1 onto the trainer's config dataclasses (see trainer.config_from_args), whose field
    defaults are the flags' defaults: defined once, in config.py."""
    from .config import DataConfig, JointConfig, ModelConfig, OptimConfig, RunConfig

    M, D, O, R, J = ModelConfig(), DataConfig(), OptimConfig(), RunConfig(), JointConfig()
    t.add_argument("--data", required=True, action="append",
                   help="conversations JSONL or distilled directory from `draftheads distill`; repeat to train on "
                        "several (each is split into train / held-out on its own, so adding one leaves the others' "
                        "held-out parts as they were)")
    t.add_argument("--output", "-o", required=True, help="run directory: checkpoints, eval JSON, final heads in <dir>/heads")
    t.add_argument("--method", default="medusa1", choices=["medusa1", "medusa2", "hydra", "hydra++"],
                   help="medusa1: independent heads; medusa2: Medusa heads plus a LoRA adapter on the backbone, trained "
                        "together (faster drafts, NOT lossless w.r.t. the original model; docs/training.md); hydra: "
                        "each head sees the path drafted before it; hydra++: hydra plus a prefix decoder layer (use "
                        "with --soft-targets --dropout 0.2, the paper's recipe)")
    t.add_argument("--backbone", default=M.backbone,
                   help="HF model directory or cached name (default: embedded SmolLM2)")
    t.add_argument("--dtype", default=M.dtype, help="backbone dtype: float32, float16, bfloat16 (default: fp32 on CPU, "
                                                    "bf16 on CUDA)")
    t.add_argument("--num-heads", type=int, default=M.num_heads, help="draft heads (head k guesses token k+2 ahead)")
    t.add_argument("--num-layers", type=int, default=M.num_layers, help="residual blocks per head")
    t.add_argument("--dropout", type=float, default=M.dropout, help="dropout before every head block (Hydra heads)")
    t.add_argument("--grounded-residual", default=M.grounded_residual, choices=defaults.GROUNDED_RESIDUALS,
                   help="Hydra heads' first block: a learned residual projection of [h, path embeddings] (Hydra's) "
                        "or h itself (half the parameters)")
    t.add_argument("--prefix-token", action="store_true", default=M.prefix_token,
                   help="Hydra++: the prefix layer reads each position's hidden state with the token that followed "
                        "it (EAGLE's pairing), so the heads see the root through attention too")
    t.add_argument("--lm-head", default=M.lm_head, choices=["own", "shared"],
                   help="own: each head has its own LM head; shared: the backbone's, frozen")
    t.add_argument("--trim-vocab", type=int, default=M.trim_vocab, metavar="N",
                   help="VocabTrim: heads predict the N most frequent output tokens (0: the full vocabulary)")
    t.add_argument("--epochs", type=float, default=O.epochs, help="passes over the training split")
    t.add_argument("--batch-size", type=at_least(1), default=O.batch_size, help="sequences per step (per process)")
    t.add_argument("--lr", type=float, default=O.lr, help="AdamW peak learning rate")
    t.add_argument("--weight-decay", type=float, default=O.weight_decay, help="AdamW weight decay")
    t.add_argument("--warmup", type=float, default=O.warmup, help="warmup fraction of the steps")
    t.add_argument("--decay", type=float, default=O.decay, help="head k's loss weight is decay**k")
    t.add_argument("--max-length", type=at_least(2), default=D.max_length, help="tokens per conversation (longer ones are cut)")
    t.add_argument("--eval-fraction", type=float, default=D.eval_fraction,
                   help="share of conversations held out for the per-epoch accuracy")
    t.add_argument("--train-tokens", type=at_least(1), default=D.train_tokens, metavar="N",
                   help="train on a seeded subset of the training split with ~N assistant tokens; the held-out "
                        "split is unchanged (data-size curves)")
    t.add_argument("--shards", type=int, default=D.shards, metavar="N",
                   help="a distilled directory: train on its first N finished shards only (hidden states are "
                        "computed for those only)")
    t.add_argument("--precompute-features", action="store_true", help="run the backbone once, train on stored hidden states")
    t.add_argument("--features-dir", default=None, help="cache for precomputed features, shared by runs (default: --output)")
    t.add_argument("--feature-dtype", default=D.feature_dtype, choices=["float32", "bfloat16"],
                   help="precision of the feature pass: bfloat16 (autocast) is ~3x faster on CPUs with BF16 "
                        "instructions, features within ~1%% of fp32")
    t.add_argument("--soft-targets", action="store_true", help="targets are the backbone's own next-token distributions")
    t.add_argument("--checkpoint-every", type=at_least(1), default=R.checkpoint_every, help="steps between checkpoints")
    t.add_argument("--feature-batch", type=at_least(1), default=O.feature_batch,
                   help="positions per step with --precompute-features")
    t.add_argument("--save-dtype", default=R.save_dtype, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the final heads file (loading converts to the backbone's dtype)")
    t.add_argument("--seed", type=int, default=R.seed, help="seeds initialisation, split and batch order")
    g = t.add_argument_group("medusa2 (--method medusa2)")
    g.add_argument("--lora-rank", type=int, default=J.lora_rank, help="LoRA rank of the backbone's adapter")
    g.add_argument("--lora-alpha", type=float, default=J.lora_alpha, help="LoRA alpha (the update is scaled by alpha/rank)")
    g.add_argument("--lora-dropout", type=float, default=J.lora_dropout, help="dropout on the LoRA branch")
    g.add_argument("--lora-targets", default=",".join(J.lora_targets),
                   help="comma-separated module names to adapt, or all-linear (every linear layer but the LM head)")
    g.add_argument("--adapter-lr", type=float, default=J.adapter_lr,
                   help="the adapter's peak learning rate (the heads use --lr, higher)")
    g.add_argument("--heads-coefficient", type=float, default=J.heads_coefficient,
                   help="lambda: loss = KL(original || tuned) + lambda * sum_k decay^k head loss_k; larger drafts "
                        "better and moves the backbone further from the original")
    g.add_argument("--heads-warmup-epochs", type=float, default=J.heads_warmup_epochs,
                   help="stage 1: epochs of heads-only training (Medusa-1, frozen backbone) before the joint stage, "
                        "which runs --epochs")
    g.add_argument("--init-heads", default=J.init_heads,
                   help="start the joint stage from these Medusa-1 heads (a directory or 'default') instead of a stage 1")
    g.add_argument("--merge", action="store_true", help="also write the backbone with the adapter merged to <output>/merged")
    add_threads(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
