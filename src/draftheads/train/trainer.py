"""Medusa-1 training: a frozen backbone, heads trained on its own distilled answers (Hydra heads too;
Medusa-2, which also tunes the backbone, is train/medusa2.py and starts with this trainer as its stage 1).

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
import pickle
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbone import load_backbone, output_embedding_fingerprint
from ..errors import UserError, output_dir
from ..heads import HeadsConfig, build_heads, save_heads
from ..heads.vocab import build_vocab_map, count_tokens, full_to_trimmed, trim_targets
from .config import DataConfig, JointConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from .data import IGNORE, head_targets, load_training_sets


def config_from_args(args) -> TrainConfig:
    head_type = {"medusa1": "medusa", "medusa2": "medusa", "hydra": "hydra", "hydra++": "hydra++"}.get(args.method)
    if head_type is None:
        raise UserError(f"unknown training method {args.method!r} (medusa1, medusa2, hydra, hydra++)")
    cfg = TrainConfig(
        model=ModelConfig(backbone=args.backbone, dtype=args.dtype, num_heads=args.num_heads, num_layers=args.num_layers,
                          lm_head=args.lm_head, trim_vocab=args.trim_vocab, head_type=head_type,
                          dropout=args.dropout, grounded_residual=args.grounded_residual,
                          prefix_token=args.prefix_token),
        data=DataConfig(paths=list(args.data), max_length=args.max_length, eval_fraction=args.eval_fraction,
                        train_tokens=args.train_tokens, shards=args.shards,
                        precompute_features=args.precompute_features, features_dir=args.features_dir,
                        feature_dtype=args.feature_dtype),
        optim=OptimConfig(epochs=args.epochs, batch_size=args.batch_size, feature_batch=args.feature_batch, lr=args.lr,
                          weight_decay=args.weight_decay, warmup=args.warmup, decay=args.decay,
                          soft_targets=args.soft_targets),
        run=RunConfig(output=args.output, checkpoint_every=args.checkpoint_every, seed=args.seed, threads=args.threads,
                      progress=not args.no_progress, save_dtype=args.save_dtype),
        joint=JointConfig(enabled=args.method == "medusa2", lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                          lora_dropout=args.lora_dropout,
                          lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
                          adapter_lr=args.adapter_lr, heads_coefficient=args.heads_coefficient,
                          heads_warmup_epochs=args.heads_warmup_epochs, init_heads=args.init_heads, merge=args.merge))
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
    if vocab_map is not None:  # only the kept rows: 12x less work for 4,096 of 49,152 ids
        lm_weight = lm_weight[vocab_map]
    logits = next_hidden.to(lm_weight.dtype) @ lm_weight.T  # [K, N, V']
    return logits.float().softmax(-1)


# ---------------------------------------------------------------- features

@torch.no_grad()
def backbone_hidden(model, seqs: list[torch.Tensor], device, dtype: str = "float32") -> list[torch.Tensor]:
    """Final-norm hidden states [T_i, H] of each sequence (right-padded batch, attention mask); `dtype`
    "bfloat16" runs under bf16 autocast."""
    T = max(s.shape[0] for s in seqs)
    pad = torch.zeros(len(seqs), T, dtype=torch.long)
    att = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        pad[i, :s.shape[0]], att[i, :s.shape[0]] = s, 1
    device = torch.device(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        h = model.base_model(input_ids=pad.to(device), attention_mask=att.to(device)).last_hidden_state  # [B, T, H]
    return [h[i, :s.shape[0]] for i, s in enumerate(seqs)]


def precompute(model, seqs, device, path: Path, batch: int, progress: bool,
               stored: list[torch.Tensor | None] | None = None, dtype: str = "float32") -> torch.Tensor:
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
        for i, h in zip(idx, backbone_hidden(model, [seqs[i][0] for i in idx], device, dtype)):
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


def planned_sizes(heads, save_dtype: str) -> tuple[int, int]:
    """Bytes of checkpoint.pt (the heads' state plus AdamW's two moments per trainable weight) and of
    the final heads file (floating tensors in save_dtype), said before either is written."""
    state = heads.state_dict().values()
    moments = 2 * sum(p.numel() * p.element_size() for p in heads.parameters() if p.requires_grad)
    item = torch.empty(0, dtype=getattr(torch, save_dtype)).element_size()
    final = sum(t.numel() * (item if t.is_floating_point() else t.element_size()) for t in state)
    return sum(t.numel() * t.element_size() for t in state) + moments, final


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def load_checkpoint(path: Path):
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # cut short or another file: checkpoints are written whole
        raise UserError(f"cannot read the checkpoint {path} ({str(e).splitlines()[0]}): delete it to start the run "
                        f"over") from None


def resume(out: Path, heads, opt, sched) -> tuple[Path, int, dict | None, list]:
    """The run's checkpoint path, the step to go on from, the checkpoint (for callers with more state)
    and the eval history so far. Heads, optimiser and schedule are restored in place."""
    ckpt_path, step = out / "checkpoint.pt", 0
    state = load_checkpoint(ckpt_path)
    if state is not None:
        try:
            heads.load_state_dict(state["heads"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{out} holds a checkpoint of other settings ({str(e).strip().splitlines()[0]}): resume with "
                            f"the options of its train_config.json, or train into another --output") from None
        step = state["step"]
    history_path = out / "eval.json"
    history = json.loads(history_path.read_text()) if history_path.exists() and step else []
    return ckpt_path, step, state, history


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(heads, hidden: list[torch.Tensor], seqs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """hidden [T_i, H] and (ids, mask) [T_i] of each held-out conversation. Top-1/top-5 accuracy per head
    in full ids, through the drafter's teacher-forced top-k (Hydra heads see the true path): a target
    outside a VocabTrim map counts as a miss, so trimmed and untrimmed heads compare fairly."""
    K = heads.cfg.num_heads
    hit1, hit5, n = torch.zeros(K), torch.zeros(K), torch.zeros(K)
    for h, (ids, mask) in zip(hidden, seqs):
        top = heads.teacher_topk(h, ids.to(h.device), 5).cpu()  # [K, T, 5]
        t = head_targets(ids, mask, K)  # [T, K]
        for k in range(K):
            v = t[:, k] != IGNORE
            hit1[k] += (top[k, v, 0] == t[v, k]).sum()
            hit5[k] += (top[k, v] == t[v, k, None]).any(-1).sum()
            n[k] += v.sum()
    n = n.clamp(min=1)
    return {"top1": (hit1 / n).tolist(), "top5": (hit5 / n).tolist(), "positions": int(n[0])}


def next_hidden(feats: torch.Tensor, pos: torch.Tensor, K: int) -> torch.Tensor:
    """feats [S, H], positions [N] -> the hidden states at t+1..t+K [K, N, H], whose LM head gives the
    distribution of head k's target token t+2+k (soft targets; past the end clamped: ignored anyway)."""
    return feats[(pos[None] + 1 + torch.arange(K, device=pos.device)[:, None]).clamp(max=feats.shape[0] - 1)]


def path_tokens(ids: torch.Tensor, pos: torch.Tensor, K: int) -> torch.Tensor:
    """ids [S] (one sequence or a concatenation), positions [N] -> the tokens x1..xK after each [N, K]
    (Hydra's teacher-forced path; past the end clamped: those targets are ignored anyway)."""
    return ids[(pos[:, None] + 1 + torch.arange(K, device=pos.device)).clamp(max=ids.shape[0] - 1)]


def sequence_batch(hs: list[torch.Tensor], seqs, K: int, soft: bool):
    """Whole sequences, right-padded, for heads with a prefix layer (Hydra++) and the online mode.
    Returns hidden [B, T, H], path [B, T, K], select [B, T] (positions with a target), targets [N, K]
    and, for soft targets, the hidden states whose LM head gives each target's distribution [K, N, H]."""
    B, T, H = len(hs), max(h.shape[0] for h in hs), hs[0].shape[1]
    hidden = hs[0].new_zeros(B, T, H)
    path = torch.zeros(B, T, K, dtype=torch.long)
    targets = torch.full((B, T, K), IGNORE, dtype=torch.long)
    nxt = hs[0].new_zeros(B, T, K, H) if soft else None
    for i, (h, (ids, mask)) in enumerate(zip(hs, seqs)):
        n, pos = h.shape[0], torch.arange(h.shape[0])
        hidden[i, :n] = h
        path[i, :n] = path_tokens(ids, pos, K)
        targets[i, :n] = head_targets(ids, mask, K)
        if soft:
            nxt[i, :n] = next_hidden(h, pos, K).transpose(0, 1)  # [n, K, H]
    select = (targets != IGNORE).any(-1)  # [B, T]
    return hidden, path, select, targets[select], (nxt[select].transpose(0, 1) if soft else None)


# ---------------------------------------------------------------- the run

def train(cfg: TrainConfig, backbone=None) -> Path:
    """Train heads; returns the final heads directory (<output>/heads). `backbone` (a loaded Backbone)
    overrides cfg.model.backbone, for tests and notebooks. cfg.joint.enabled: Medusa-2 (train/medusa2.py)."""
    if cfg.joint.enabled:  # Medusa-2: heads and a LoRA adapter on the backbone (train/medusa2.py)
        from .medusa2 import train_medusa2

        return train_medusa2(cfg, backbone)
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg.validate()
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    if r.threads:
        torch.set_num_threads(r.threads)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    out = output_dir(r.output, "--output")
    if d.features_dir:
        output_dir(d.features_dir, "--features-dir")
    torch.manual_seed(r.seed)

    # 1. Backbone (frozen) and data.
    bb = backbone or load_backbone(m.backbone, device=str(acc.device), dtype=m.dtype)
    model, tok = bb.model, bb.tokenizer
    model.requires_grad_(False).eval()
    fill = None
    if d.precompute_features:
        fill = (lambda ids: backbone_hidden(model, ids, acc.device, d.feature_dtype), r.progress)
    with acc.main_process_first():  # the main process computes missing features, the others then read them
        seqs, stored, train_idx, eval_idx, source = load_training_sets(
            d.paths, tok, d.max_length, d.eval_fraction, r.seed, output_embedding_fingerprint(model),
            fill if acc.is_main_process else None, shards=d.shards)
    out.mkdir(parents=True, exist_ok=True)  # once the data has loaded: a run that cannot start leaves nothing behind
    if acc.is_main_process:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    if d.train_tokens:  # a subset of the training split; the held-out split stays the same for every size
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(r.seed)).tolist()
        count = torch.tensor([int(seqs[i][1].sum()) for i in train_idx])[order].cumsum(0)  # assistant tokens
        train_idx = sorted(train_idx[j] for j in order[:int((count < d.train_tokens).sum()) + 1])
    lm_weight = model.get_output_embeddings().weight.detach()  # [V, H]
    V, H = lm_weight.shape

    # 2. Heads, VocabTrim map from the training split's assistant tokens. A trim of N >= the vocabulary
    # keeps it whole: the default N suits real vocabularies (tens of thousands), not tiny ones.
    trim = m.trim_vocab if m.trim_vocab and m.trim_vocab < V else None
    if m.trim_vocab and trim is None and acc.is_main_process:
        print(f"train: trim_vocab {m.trim_vocab} >= the vocabulary ({V}): the heads keep the full vocabulary")
    hcfg = HeadsConfig(num_heads=m.num_heads, hidden_size=H, vocab_size=V, num_layers=m.num_layers,
                       lm_head=m.lm_head, trimmed_vocab=trim, backbone=bb.name, head_type=m.head_type,
                       dropout=m.dropout, grounded_residual=m.grounded_residual, prefix_token=m.prefix_token,
                       backbone_fingerprint=output_embedding_fingerprint(model))
    heads = build_heads(hcfg)
    table = None
    if trim:
        gen_eos = getattr(model.generation_config, "eos_token_id", None)  # an int, or a list (Llama-3, Qwen2.5)
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        eos = sorted({t for t in [tok.eos_token_id, *gen_eos] if isinstance(t, int)})
        heads.vocab_map.copy_(build_vocab_map(count_tokens((seqs[i] for i in train_idx), V), trim, eos))
        table = full_to_trimmed(heads.vocab_map, V)
    heads.init_lm_heads_from(model)
    heads.to(acc.device)
    heads.attach(model)
    vmap = heads.vocab_map

    # 3. Examples: positions with targets (or, for heads with a prefix layer, whole sequences); hidden
    # states precomputed once or computed per batch.
    train_seqs, eval_seqs = [seqs[i] for i in train_idx], [seqs[i] for i in eval_idx]
    hydra, by_sequence = m.head_type != "medusa", m.head_type == "hydra++"
    feats = None
    if d.precompute_features:
        # Named by a hash of the exact token streams, the split and the backbone, so runs that differ only
        # in head settings share one features file (--features-dir) and a changed input never reuses a stale one.
        dt = "" if d.feature_dtype == "float32" else f"|{d.feature_dtype}"  # float32 keeps older caches' names
        h = hashlib.sha1(f"{bb.name}|{output_embedding_fingerprint(model)}|{train_idx}|{eval_idx}{dt}".encode())
        for ids, _ in seqs:
            h.update(ids.numpy().tobytes())
        fpath = Path(d.features_dir or out) / f"features-{h.hexdigest()[:16]}.pt"
        fpath.parent.mkdir(parents=True, exist_ok=True)
        known = [stored[i] for i in train_idx] + [stored[i] for i in eval_idx]
        if acc.is_main_process:
            feats = precompute(model, train_seqs + eval_seqs, acc.device, fpath, 8, r.progress, known, d.feature_dtype)
        acc.wait_for_everyone()
        if not acc.is_main_process:
            feats = precompute(model, train_seqs + eval_seqs, acc.device, fpath, 8, False, known, d.feature_dtype)  # [sum T, H] fp16
        del known, stored
        starts = torch.tensor([0] + [s[0].shape[0] for s in train_seqs + eval_seqs]).cumsum(0)  # [n + 1]
        seq_feats = [feats[starts[i]:starts[i + 1]] for i in range(len(starts) - 1)]  # views, [T_i, H] each
        eval_hidden = seq_feats[len(train_seqs):]
        pos, tgt = flat_examples(train_seqs, m.num_heads)
        flat_ids = torch.cat([s[0] for s in train_seqs + eval_seqs])  # aligned with feats
        n_items, per_step = (len(train_seqs), o.batch_size) if by_sequence else (pos.shape[0], o.feature_batch)
    else:
        n_items, per_step = len(train_seqs), o.batch_size
        eval_hidden = [h for b in range(0, len(eval_seqs), 8)
                       for h in backbone_hidden(model, [s[0] for s in eval_seqs[b:b + 8]], acc.device)]

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
    ckpt_path, step, _, history = resume(out, heads, opt, sched)
    history_path = out / "eval.json"

    # 6. The loop.
    if acc.is_main_process:
        print(f"train: {len(train_seqs)} conversations ({n_items} items), {len(eval_seqs)} held out; {world} process(es) "
              f"on {acc.device} ({acc.distributed_type}); {steps_per_epoch} steps/epoch, {total} steps, from step {step}",
              flush=True)
        ckpt_bytes, heads_bytes = planned_sizes(heads, r.save_dtype)
        print(f"train: will write {ckpt_path} ({_mb(ckpt_bytes)}: heads and AdamW state, every "
              f"{r.checkpoint_every} steps and per epoch) and {out / 'heads'} ({_mb(heads_bytes)} in {r.save_dtype})",
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
            path = select = None
            if feats is not None and not by_sequence:
                p = pos[idx]  # [N] global positions in feats
                path = path_tokens(flat_ids, p, m.num_heads) if hydra else None  # [N, K]
                hidden = feats[p].to(acc.device, torch.float32)  # [N, H]
                targets = tgt[idx]  # [N, K] full ids
                nxt = next_hidden(feats, p, m.num_heads) if o.soft_targets else None  # [K, N, H]
            else:
                batch = [train_seqs[i] for i in idx.tolist()]
                hs = ([seq_feats[i].float() for i in idx.tolist()] if feats is not None
                      else [h.float() for h in backbone_hidden(model, [s[0] for s in batch], acc.device)])
                hidden, path, select, targets, nxt = sequence_batch(hs, batch, m.num_heads, o.soft_targets)
                if not by_sequence:  # no prefix layer: the positions with targets are all the heads need
                    hidden, path, select = hidden[select], path[select], None  # [N, H], [N, K]
                hidden = hidden.to(acc.device)
            targets = targets.to(acc.device)
            hard = trim_targets(targets, table.to(acc.device)) if table is not None else targets
            soft = soft_targets(lm_weight, nxt.to(acc.device), vmap) if nxt is not None else None
            # Soft targets exist wherever the data token does, trimmed or not: validity from the full ids.
            if hydra:  # [K, N, V']; Hydra++ runs its prefix layer over the whole sequences first
                logits = ddp_heads(hidden, path.to(acc.device), None if select is None else select.to(acc.device))
            else:
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
            hs = [h.to(acc.device, torch.float32) for h in eval_hidden]
            res = evaluate(heads, hs, eval_seqs)
            if len(d.paths) > 1:  # each source's held-out part alone too: a source's figure stays comparable
                res["per_source"] = {
                    path: evaluate(heads, [h for h, i in zip(hs, eval_idx) if source[i] == path],
                                   [eval_seqs[j] for j, i in enumerate(eval_idx) if source[i] == path])
                    for path in d.paths}
            heads.train()
            res.update(epoch=epoch + 1, step=step, train_loss=float(loss.item()), time=time.time())
            history.append(res)
            history_path.write_text(json.dumps(history, indent=1) + "\n")
            bar.write("eval epoch %d: top1 %s top5 %s" % (epoch + 1, " ".join(f"{a:.3f}" for a in res["top1"]),
                                                          " ".join(f"{a:.3f}" for a in res["top5"])))
            for path, part in res.get("per_source", {}).items():
                bar.write(f"  {path}: top1 {' '.join(f'{a:.3f}' for a in part['top1'])}")
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
