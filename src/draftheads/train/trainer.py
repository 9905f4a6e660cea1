"""Medusa-1 training: a frozen backbone, heads trained on its own distilled answers.

Reads top to bottom: load, tokenise, (VocabTrim map), (precompute features), then a plain loop of
AdamW steps with a warmup+cosine schedule, a held-out evaluation per epoch and atomic checkpoints.
Runs unchanged under `accelerate launch` (DDP): every process takes its own slice of each batch
order and the heads' gradients are all-reduced by the prepared (wrapped) module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbone import load_backbone, output_embedding_fingerprint
from ..errors import UserError
from ..heads import HeadsConfig, MedusaHeads, save_heads
from ..heads.vocab import build_vocab_map, count_tokens, full_to_trimmed, trim_targets
from .config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from .data import IGNORE, head_targets, load_training_data, split


def config_from_args(args) -> TrainConfig:
    if args.method != "medusa1":
        raise UserError(f"unknown training method {args.method!r} (this version trains medusa1)")
    cfg = TrainConfig(
        model=ModelConfig(backbone=args.backbone, dtype=args.dtype, num_heads=args.num_heads, num_layers=args.num_layers,
                          lm_head=args.lm_head, trim_vocab=args.trim_vocab),
        data=DataConfig(path=args.data, max_length=args.max_length, eval_fraction=args.eval_fraction,
                        precompute_features=args.precompute_features, features_dir=args.features_dir),
        optim=OptimConfig(epochs=args.epochs, batch_size=args.batch_size, feature_batch=args.feature_batch, lr=args.lr,
                          weight_decay=args.weight_decay, warmup=args.warmup, decay=args.decay,
                          soft_targets=args.soft_targets),
        run=RunConfig(output=args.output, checkpoint_every=args.checkpoint_every, seed=args.seed, threads=args.threads,
                      progress=not args.no_progress, save_dtype=args.save_dtype))
    cfg.validate()
    return cfg


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def medusa_loss(logits: torch.Tensor, targets: torch.Tensor, decay: float, soft: torch.Tensor | None = None):
    """logits [K, N, V'] (V' = trimmed or full vocab); targets [N, K] ids in the same id space, IGNORE where none;
    soft [K, N, V'] target probabilities or None. Returns (sum_k decay^k * mean CE_k, per-head losses [K])."""
    K, N, V = logits.shape
    assert targets.shape == (N, K), (targets.shape, logits.shape)
    per_head = []
    for k in range(K):
        valid = targets[:, k] != IGNORE  # [N]
        if not valid.any():
            per_head.append(logits.new_zeros(()))
            continue
        if soft is None:
            per_head.append(F.cross_entropy(logits[k][valid].float(), targets[valid, k]))
        else:
            logp = logits[k][valid].float().log_softmax(-1)  # [n, V']
            per_head.append(-(soft[k][valid] * logp).sum(-1).mean())
    per_head = torch.stack(per_head)  # [K]
    weights = decay ** torch.arange(K, dtype=per_head.dtype, device=per_head.device)
    return (weights * per_head).sum(), per_head.detach()


def soft_targets(lm_weight: torch.Tensor, next_hidden: torch.Tensor, vocab_map: torch.Tensor | None) -> torch.Tensor:
    """The backbone's own distribution over the token each head must draft.

    next_hidden [K, N, H]: hidden state at t+1+k (whose LM head predicts token t+2+k, head k's target).
    Returns probabilities [K, N, V'], renormalised over the kept ids under VocabTrim."""
    logits = next_hidden.to(lm_weight.dtype) @ lm_weight.T  # [K, N, V]
    if vocab_map is not None:
        logits = logits[..., vocab_map]
    return logits.float().softmax(-1)


# ---------------------------------------------------------------- features

@torch.no_grad()
def backbone_hidden(model, seqs: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Final-norm hidden states [T_i, H] of each sequence (right-padded batch, attention mask)."""
    T = max(s.shape[0] for s in seqs)
    pad = torch.zeros(len(seqs), T, dtype=torch.long)
    att = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        pad[i, :s.shape[0]], att[i, :s.shape[0]] = s, 1
    h = model.base_model(input_ids=pad.to(device), attention_mask=att.to(device)).last_hidden_state  # [B, T, H]
    return [h[i, :s.shape[0]] for i, s in enumerate(seqs)]


def precompute(model, seqs, device, path: Path, batch: int, progress: bool,
               stored: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """All sequences' hidden states, concatenated [sum T_i, H] in fp16. `stored` holds those distillation
    kept (None where missing): only the missing ones are computed, and cached at `path`."""
    out: list[torch.Tensor | None] = list(stored) if stored is not None else [None] * len(seqs)
    missing = [i for i, h in enumerate(out) if h is None]
    if not missing:
        return torch.cat(out)
    if path.exists():
        return torch.load(path, weights_only=True)["hidden"]
    from tqdm.auto import tqdm

    order = sorted(missing, key=lambda i: seqs[i][0].shape[0])  # similar lengths share a batch
    for b in tqdm(range(0, len(order), batch), desc="features", disable=not progress, unit="batch"):
        idx = order[b:b + batch]
        for i, h in zip(idx, backbone_hidden(model, [seqs[i][0] for i in idx], device)):
            out[i] = h.to("cpu", torch.float16)
    hidden = torch.cat(out)  # [sum T_i, H]
    tmp = path.with_suffix(".tmp")
    torch.save({"hidden": hidden}, tmp)
    os.replace(tmp, path)
    return hidden


def flat_examples(seqs, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions with at least one head target: (global position [N], targets [N, K] in full ids)."""
    pos, tgt, off = [], [], 0
    for ids, mask in seqs:
        t = head_targets(ids, mask, num_heads)  # [T, K]
        keep = (t != IGNORE).any(-1).nonzero().squeeze(-1)
        pos.append(keep + off)
        tgt.append(t[keep])
        off += ids.shape[0]
    return torch.cat(pos), torch.cat(tgt)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, heads, opt, sched, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"heads": heads.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


def load_checkpoint(path: Path):
    return torch.load(path, weights_only=True, map_location="cpu") if path.exists() else None


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(heads: MedusaHeads, hidden: torch.Tensor, targets: torch.Tensor, batch: int = 1024) -> dict:
    """hidden [N, H], targets [N, K] (full ids). Top-1/top-5 accuracy per head in full ids: a target
    outside a VocabTrim map counts as a miss, so trimmed and untrimmed heads compare fairly."""
    K = targets.shape[1]
    hit1, hit5, n = torch.zeros(K), torch.zeros(K), torch.zeros(K)
    dtype = next(heads.parameters()).dtype
    for b in range(0, hidden.shape[0], batch):
        h, t = hidden[b:b + batch].to(dtype), targets[b:b + batch]
        top = heads.to_full_ids(heads(h).topk(5, dim=-1).indices).cpu()  # [K, n, 5]
        for k in range(K):
            v = t[:, k] != IGNORE
            hit1[k] += (top[k, v, 0] == t[v, k]).sum()
            hit5[k] += (top[k, v] == t[v, k, None]).any(-1).sum()
            n[k] += v.sum()
    n = n.clamp(min=1)
    return {"top1": (hit1 / n).tolist(), "top5": (hit5 / n).tolist(), "positions": int(n[0])}


# ---------------------------------------------------------------- the run

def train(cfg: TrainConfig, backbone=None) -> Path:
    """Train heads; returns the final heads directory (<output>/heads). `backbone` (a loaded Backbone)
    overrides cfg.model.backbone, for tests and notebooks."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg.validate()
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    if r.threads:
        torch.set_num_threads(r.threads)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    out = Path(r.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(r.seed)
    if acc.is_main_process:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")

    # 1. Backbone (frozen) and data.
    bb = backbone or load_backbone(m.backbone, device=str(acc.device), dtype=m.dtype)
    model, tok = bb.model, bb.tokenizer
    model.requires_grad_(False).eval()
    seqs, stored = load_training_data(d.path, tok, d.max_length, output_embedding_fingerprint(model))
    usable = [i for i, s in enumerate(seqs) if s[1][2:].any()]  # need at least one target
    seqs, stored = [seqs[i] for i in usable], [stored[i] for i in usable]
    if len(seqs) < 2:
        raise UserError(f"{d.path}: need at least 2 usable conversations, found {len(seqs)}")
    train_idx, eval_idx = split(len(seqs), d.eval_fraction, r.seed)
    lm_weight = model.get_output_embeddings().weight.detach()  # [V, H]
    V, H = lm_weight.shape

    # 2. Heads, VocabTrim map from the training split's assistant tokens.
    hcfg = HeadsConfig(num_heads=m.num_heads, hidden_size=H, vocab_size=V, num_layers=m.num_layers,
                       lm_head=m.lm_head, trimmed_vocab=m.trim_vocab, backbone=bb.name,
                       backbone_fingerprint=output_embedding_fingerprint(model))
    heads = MedusaHeads(hcfg)
    table = None
    if m.trim_vocab:
        if m.trim_vocab > V:
            raise UserError(f"--trim-vocab {m.trim_vocab} exceeds the vocabulary ({V})")
        eos = [t for t in {tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)} if isinstance(t, int)]
        heads.vocab_map.copy_(build_vocab_map(count_tokens((seqs[i] for i in train_idx), V), m.trim_vocab, eos))
        table = full_to_trimmed(heads.vocab_map, V)
    heads.init_lm_heads_from(model)
    heads.to(acc.device)
    heads.attach(model)
    vmap = heads.vocab_map

    # 3. Examples: positions with targets; hidden states precomputed once or computed per batch.
    train_seqs, eval_seqs = [seqs[i] for i in train_idx], [seqs[i] for i in eval_idx]
    feats = None
    if d.precompute_features:
        # Named by a hash of the exact token streams, the split and the backbone, so runs that differ only
        # in head settings share one features file (--features-dir) and a changed input never reuses a stale one.
        h = hashlib.sha1(f"{bb.name}|{output_embedding_fingerprint(model)}|{train_idx}|{eval_idx}".encode())
        for ids, _ in seqs:
            h.update(ids.numpy().tobytes())
        fpath = Path(d.features_dir or out) / f"features-{h.hexdigest()[:16]}.pt"
        fpath.parent.mkdir(parents=True, exist_ok=True)
        known = [stored[i] for i in train_idx] + [stored[i] for i in eval_idx]
        if acc.is_main_process:
            feats = precompute(model, train_seqs + eval_seqs, acc.device, fpath, 8, r.progress, known)
        acc.wait_for_everyone()
        if not acc.is_main_process:
            feats = precompute(model, train_seqs + eval_seqs, acc.device, fpath, 8, False, known)  # [sum T, H] fp16
        del known, stored
        pos, tgt = flat_examples(train_seqs, m.num_heads)
        n_train_tokens = sum(s[0].shape[0] for s in train_seqs)
        epos, etgt = flat_examples(eval_seqs, m.num_heads)
        eval_hidden, eval_targets = feats[epos + n_train_tokens], etgt
        n_items, per_step = pos.shape[0], o.feature_batch
    else:
        n_items, per_step = len(train_seqs), o.batch_size
        epos, etgt = flat_examples(eval_seqs, m.num_heads)
        eval_hidden = torch.cat([h.cpu() for h in backbone_hidden(model, [s[0] for s in eval_seqs], acc.device)])[epos]
        eval_targets = etgt

    # 4. Optimiser and schedule: steps counted per process (each takes per_step items a step).
    world = acc.num_processes
    steps_per_epoch = max(1, math.ceil(n_items / (per_step * world)))
    total = max(1, math.ceil(o.epochs * steps_per_epoch))
    warmup = max(1, int(o.warmup * total))
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    ddp_heads, opt = acc.prepare(heads, opt)

    # 5. Resume: the checkpoint holds heads, optimiser, schedule and the step; batch orders are seeded
    # per epoch, so step s of a resumed run sees exactly the batch it would have seen.
    ckpt_path, step = out / "checkpoint.pt", 0
    state = load_checkpoint(ckpt_path)
    if state is not None:
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = state["step"]
    history_path = out / "eval.json"
    history = json.loads(history_path.read_text()) if history_path.exists() and step else []

    # 6. The loop.
    if acc.is_main_process:
        print(f"train: {len(train_seqs)} conversations ({n_items} items), {len(eval_seqs)} held out; {world} process(es) "
              f"on {acc.device} ({acc.distributed_type}); {steps_per_epoch} steps/epoch, {total} steps, from step {step}",
              flush=True)
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not (r.progress and acc.is_main_process))
    ddp_heads.train()
    while step < total:
        epoch = step // steps_per_epoch
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(r.seed * 1000 + epoch))
        mine = order[acc.process_index::world]
        mine = mine.repeat(math.ceil(steps_per_epoch * per_step / max(1, mine.shape[0])))  # equal steps on every rank
        for b in range(step % steps_per_epoch, steps_per_epoch):
            idx = mine[b * per_step:(b + 1) * per_step]
            if feats is not None:
                p = pos[idx]  # [N] global positions in feats
                hidden = feats[p].to(acc.device, torch.float32)  # [N, H]
                targets = tgt[idx]  # [N, K] full ids
                nxt = (feats[(p[None] + 1 + torch.arange(m.num_heads)[:, None]).clamp(max=feats.shape[0] - 1)]
                       if o.soft_targets else None)  # [K, N, H]
            else:
                batch = [train_seqs[i] for i in idx.tolist()]
                hs = backbone_hidden(model, [s[0] for s in batch], acc.device)  # [T_i, H] each
                tt = [head_targets(ids, mask, m.num_heads) for ids, mask in batch]  # [T_i, K] each
                keep = [(t != IGNORE).any(-1) for t in tt]
                hidden = torch.cat([h[k] for h, k in zip(hs, keep)]).float()  # [N, H]
                targets = torch.cat([t[k] for t, k in zip(tt, keep)])  # [N, K]
                nxt = None
                if o.soft_targets:
                    rows = []
                    for h, k_ in zip(hs, keep):
                        ix = k_.nonzero().squeeze(-1)
                        rows.append(h[(ix[None] + 1 + torch.arange(m.num_heads, device=ix.device)[:, None])
                                      .clamp(max=h.shape[0] - 1)])  # [K, n, H]
                    nxt = torch.cat(rows, dim=1)
            targets = targets.to(acc.device)
            hard = trim_targets(targets, table.to(acc.device)) if table is not None else targets
            soft = soft_targets(lm_weight, nxt.to(acc.device), vmap) if nxt is not None else None
            # Soft targets exist wherever the data token does, trimmed or not: validity from the full ids.
            logits = ddp_heads(hidden)  # [K, N, V']
            loss, per_head = medusa_loss(logits, targets if soft is not None else hard, o.decay, soft)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if acc.is_main_process and r.checkpoint_every and step % r.checkpoint_every == 0:
                save_checkpoint(ckpt_path, heads, opt, sched, step)
            if step >= total:
                break
        # 7. End of epoch (or of the run): held-out accuracy per head, logged and saved.
        if acc.is_main_process:
            heads.eval()
            res = evaluate(heads, eval_hidden.to(acc.device), eval_targets.to(acc.device))
            heads.train()
            res.update(epoch=epoch + 1, step=step, train_loss=float(loss.item()), time=time.time())
            history.append(res)
            history_path.write_text(json.dumps(history, indent=1) + "\n")
            bar.write("eval epoch %d: top1 %s top5 %s" % (epoch + 1, " ".join(f"{a:.3f}" for a in res["top1"]),
                                                          " ".join(f"{a:.3f}" for a in res["top5"])))
            save_checkpoint(ckpt_path, heads, opt, sched, step)
        acc.wait_for_everyone()
    bar.close()

    final = out / "heads"
    if acc.is_main_process:
        heads.eval()
        if r.save_dtype != "float32":  # loading converts back to the backbone's dtype
            heads.to(getattr(torch, r.save_dtype))
        save_heads(heads, final)
    acc.wait_for_everyone()
    return final
