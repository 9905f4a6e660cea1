"""Medusa-2: the heads and a LoRA adapter on the backbone, trained together (`train --method medusa2`).

Stage 1, heads warm-up: Medusa-1 on the frozen backbone for `joint.heads_warmup_epochs` epochs, run by
the Medusa-1 trainer itself into <output>/stage1 (stored or precomputed hidden states are right there:
the adapter does not exist yet). `joint.init_heads` starts from finished Medusa-1 heads instead.

Stage 2, joint: peft LoRA on the backbone. Per batch of conversations,

    loss = KL(original || tuned) + heads_coefficient * sum_k decay^k CE_k

KL over the positions that predict assistant tokens, where "original" is the same model with its
adapters disabled (peft's `disable_adapter()`: no second copy in memory), and CE_k of the heads on the
TUNED hidden states, so the heads' loss also trains the adapter: that is what makes the hidden states
easier to draft from. Hidden states are computed online: stored ones are the original backbone's.
Heads learn at optim.lr, the adapter at joint.adapter_lr (lower). Checkpoints (heads, adapter,
optimiser, schedule, step), resume and `accelerate launch` work as in Medusa-1.

Output: <output>/heads (config: adapter "../adapter" and the tuned fingerprint, adapter.py),
<output>/adapter (peft's save_pretrained), and <output>/merged with `joint.merge`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..adapter import lora_changes, save_backbone, tuned_fingerprint
from ..backbone import load_backbone, output_embedding_fingerprint
from ..errors import UserError, output_dir
from ..heads import load_heads, save_heads
from ..heads.vocab import full_to_trimmed, trim_targets
from .config import TrainConfig
from .data import IGNORE, head_targets, load_training_sets
from .trainer import _mb, backbone_hidden, evaluate, lr_factor, medusa_loss, resume

ADAPTER = "../adapter"  # where the heads' config finds the adapter, relative to <output>/heads


def logits_of(model, hidden: torch.Tensor) -> torch.Tensor:
    """The backbone's logits from final hidden states: its LM head (and a final soft cap, Gemma-2's)."""
    z = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(z / cap) * cap if cap else z


def kl_to_original(peft_model, tuned: torch.Tensor, original: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Mean KL(original || tuned) of the next-token distributions at N positions, from final hidden states
    tuned [N, H] (with grad) and original [N, H]. The logits ([chunk, vocab] at a time) are recomputed in the
    backward pass rather than kept, so memory does not grow with N x vocabulary."""
    hf = peft_model.get_base_model()

    def part(t, o):
        with torch.no_grad(), peft_model.disable_adapter():  # the original's LM head, should LoRA adapt it
            lo = logits_of(hf, o).float().log_softmax(-1)
        lt = logits_of(hf, t).float().log_softmax(-1)
        return F.kl_div(lt, lo, log_target=True, reduction="sum")

    N = tuned.shape[0]
    total = tuned.sum() * 0
    for s in range(0, N, chunk):
        total = total + checkpoint(part, tuned[s:s + chunk], original[s:s + chunk], use_reentrant=False)
    return total / max(N, 1)


class Joint(nn.Module):
    """The backbone (LoRA layers injected) and the heads as one module, so that one `accelerate.prepare`
    all-reduces the gradients of both."""

    def __init__(self, model, heads):
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, ids, att, head_select):
        """ids, att [B, T]; head_select [B, T] -> tuned hidden states [B, T, H], head logits [K, N, V']."""
        h = self.model.base_model(input_ids=ids, attention_mask=att).last_hidden_state
        return h, self.heads(h[head_select].float())  # the heads train in float32, as in Medusa-1


def pad_batch(seqs, K: int):
    """Right-padded ids and attention mask [B, T]; kl_select [B, T]: positions whose next token is an
    assistant token; head_select [B, T]: positions with a head target; targets [N, K] full ids."""
    B, T = len(seqs), max(s[0].shape[0] for s in seqs)
    ids, att = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    kl_select = torch.zeros(B, T, dtype=torch.bool)
    targets = torch.full((B, T, K), IGNORE, dtype=torch.long)
    for i, (x, m) in enumerate(seqs):
        n = x.shape[0]
        ids[i, :n], att[i, :n] = x, 1
        kl_select[i, :n - 1] = m[1:]
        targets[i, :n] = head_targets(x, m, K)
    head_select = (targets != IGNORE).any(-1)
    return ids, att, kl_select, head_select, targets[head_select]


@torch.no_grad()
def evaluate_joint(peft_model, heads, seqs, device) -> dict:
    """Held-out conversations: the heads' top-1/top-5 per head on the tuned hidden states, and how far the
    tuned model moved: mean KL(original || tuned) and top-1 agreement with the original at the positions
    predicting assistant tokens."""
    hf = peft_model.get_base_model()
    tuned, kl, agree, n = [], 0.0, 0, 0
    for b in range(0, len(seqs), 8):
        part = seqs[b:b + 8]
        ht = backbone_hidden(hf, [s[0] for s in part], device)
        with peft_model.disable_adapter():
            ho = backbone_hidden(hf, [s[0] for s in part], device)
            lo = [logits_of(hf, h).float().log_softmax(-1) for h in ho]
        for t, o, (_, m) in zip(ht, lo, part):
            sel = m[1:].to(t.device)  # position t predicts token t+1
            lt = logits_of(hf, t[:-1][sel]).float().log_softmax(-1)
            kl += float(F.kl_div(lt, o[:-1][sel], log_target=True, reduction="sum"))
            agree += int((lt.argmax(-1) == o[:-1][sel].argmax(-1)).sum())
            n += int(sel.sum())
        tuned += [h.float() for h in ht]
    res = evaluate(heads, tuned, seqs)
    res.update(kl=kl / max(n, 1), agreement=agree / max(n, 1))
    return res


def save_checkpoint(path: Path, heads, peft_model, opt, sched, step: int) -> None:
    from peft import get_peft_model_state_dict

    tmp = path.with_suffix(".tmp")
    torch.save({"heads": heads.state_dict(), "adapter": get_peft_model_state_dict(peft_model), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


def warm_heads(cfg: TrainConfig, bb, out: Path, is_main: bool) -> Path:
    """Stage 1: the heads the joint stage starts from. Medusa-1 on the frozen backbone (resumable; skipped
    once <output>/stage1/heads exists), or the given init_heads."""
    from ..draftmodel import heads_dir
    from .trainer import train

    j = cfg.joint
    if j.init_heads:
        return heads_dir(j.init_heads)
    done = out / "stage1" / "heads"
    if (done / "config.json").exists():
        return done
    if j.heads_warmup_epochs <= 0:
        raise UserError("medusa2 needs warmed-up heads: --heads-warmup-epochs > 0 or --init-heads DIR")
    stage = copy.deepcopy(cfg)
    stage.joint.enabled = False
    stage.optim.epochs = j.heads_warmup_epochs
    stage.run.output, stage.run.save_dtype = str(out / "stage1"), "float32"  # stage 2 continues from full precision
    if is_main:
        print(f"train: medusa2 stage 1: heads only, {j.heads_warmup_epochs:g} epoch(s) on the frozen backbone",
              flush=True)
    return train(stage, bb)


def train_medusa2(cfg: TrainConfig, backbone=None) -> Path:
    """Train heads and a LoRA adapter; returns <output>/heads. `backbone` (a loaded Backbone) overrides
    cfg.model.backbone; its model ends up TUNED (the adapter merged into it)."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from tqdm.auto import tqdm

    cfg.validate()
    m, d, o, r, j = cfg.model, cfg.data, cfg.optim, cfg.run, cfg.joint
    if r.threads:
        torch.set_num_threads(r.threads)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    out = output_dir(r.output, "--output")
    bb = backbone or load_backbone(m.backbone, device=str(acc.device), dtype=m.dtype)
    model, tok = bb.model, bb.tokenizer
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in j.lora_targets if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in names)]
    if missing:  # before stage 1, not after it
        raise UserError(f"LoRA: the backbone has no module named {', '.join(missing)} (pass --lora-targets with this "
                        f"backbone's module names)")
    out.mkdir(parents=True, exist_ok=True)

    # 1. Stage 1 (heads warm-up), then the heads and the data of the joint stage.
    warm = warm_heads(cfg, bb, out, acc.is_main_process)
    if acc.is_main_process:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    torch.manual_seed(r.seed)
    model.requires_grad_(False).eval()
    heads = load_heads(warm, model).float().to(acc.device)
    if heads.cfg.head_type != "medusa" or heads.cfg.adapter:
        raise UserError(f"{warm}: medusa2 starts from Medusa-1 heads, not {heads.cfg.head_type} heads"
                        + (" trained with an adapter" if heads.cfg.adapter else ""))
    heads.requires_grad_(True).train()
    heads.attach(model)
    K, V = heads.cfg.num_heads, model.get_output_embeddings().weight.shape[0]
    table = full_to_trimmed(heads.vocab_map, V).to(acc.device) if heads.vocab_map is not None else None
    # Token streams only: stored hidden states are the original backbone's, not the tuned one's.
    seqs, _, train_idx, eval_idx, _ = load_training_sets(d.paths, tok, d.max_length, d.eval_fraction, r.seed,
                                                      output_embedding_fingerprint(model), shards=d.shards)  # stage 1's split
    train_seqs, eval_seqs = [seqs[i] for i in train_idx], [seqs[i] for i in eval_idx]

    # 2. The adapter (LoRA's B starts at zero: the tuned model starts as the original, KL 0) and the
    # optimiser: two groups, the heads at optim.lr, the adapter at the lower adapter_lr, one schedule.
    targets = "all-linear" if j.lora_targets == ["all-linear"] else list(j.lora_targets)
    try:
        peft_model = get_peft_model(model, LoraConfig(r=j.lora_rank, lora_alpha=j.lora_alpha,
                                                      lora_dropout=j.lora_dropout, target_modules=targets, bias="none"))
    except ValueError as e:  # target modules the backbone does not have
        raise UserError(f"LoRA: {str(e).splitlines()[0]} (pass --lora-targets with this backbone's module names)") from None
    lora_params = [p for p in model.parameters() if p.requires_grad]
    world = acc.num_processes
    steps_per_epoch = max(1, math.ceil(len(train_seqs) / (o.batch_size * world)))
    total = max(1, math.ceil(o.epochs * steps_per_epoch))
    warmup = max(1, int(o.warmup * total))
    opt = torch.optim.AdamW([{"params": [p for p in heads.parameters() if p.requires_grad], "lr": o.lr},
                             {"params": lora_params, "lr": j.adapter_lr}], weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    joint = Joint(model, heads)
    ddp_joint, opt = acc.prepare(joint, opt)

    # 3. Resume (batch orders are seeded per epoch, as in Medusa-1).
    ckpt_path, step, state, history = resume(out, heads, opt, sched)
    if state is not None:
        set_peft_model_state_dict(peft_model, state["adapter"])
    history_path = out / "eval.json"

    # 4. The loop.
    if acc.is_main_process:
        n_lora = sum(p.numel() for p in lora_params)
        print(f"train: medusa2 stage 2 (joint): {len(train_seqs)} conversations, {len(eval_seqs)} held out; LoRA rank "
              f"{j.lora_rank} on {','.join(j.lora_targets)} ({n_lora / 1e6:.2f}M weights, {_mb(4 * n_lora)} fp32); "
              f"lr heads {o.lr:g}, adapter {j.adapter_lr:g}; {world} process(es) on {acc.device}; {steps_per_epoch} "
              f"steps/epoch, {total} steps, from step {step}", flush=True)
    bar = tqdm(total=total, initial=step, desc="joint", unit="step", disable=not (r.progress and acc.is_main_process))
    loss = kl = torch.zeros(())
    while step < total:
        epoch = step // steps_per_epoch
        order = torch.randperm(len(train_seqs), generator=torch.Generator().manual_seed(r.seed * 1000 + epoch))
        mine = order[acc.process_index::world]
        mine = mine.repeat(math.ceil(steps_per_epoch * o.batch_size / max(1, mine.shape[0])))  # equal steps per rank
        for b in range(step % steps_per_epoch, steps_per_epoch):
            batch = [train_seqs[i] for i in mine[b * o.batch_size:(b + 1) * o.batch_size].tolist()]
            ids, att, kl_select, head_select, tgt = (t.to(acc.device) for t in pad_batch(batch, K))
            with torch.no_grad(), peft_model.disable_adapter():  # the original model: the same weights, no adapter
                original = model.base_model(input_ids=ids, attention_mask=att).last_hidden_state[kl_select]  # [N, H]
            model.train()  # LoRA dropout; the teacher above ran in eval mode
            hidden, logits = ddp_joint(ids, att, head_select)  # [B, T, H], [K, N', V']
            model.eval()
            kl = kl_to_original(peft_model, hidden[kl_select], original)
            heads_loss, _ = medusa_loss(logits, trim_targets(tgt, table) if table is not None else tgt, o.decay)
            loss = kl + j.heads_coefficient * heads_loss
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", kl=f"{kl.item():.4f}", heads=f"{heads_loss.item():.3f}")
            if acc.is_main_process and r.checkpoint_every and step % r.checkpoint_every == 0:
                save_checkpoint(ckpt_path, heads, peft_model, opt, sched, step)
            if step >= total:
                break
        # 5. End of epoch: the heads' accuracy and how far the tuned model moved from the original.
        if acc.is_main_process:
            heads.eval()
            res = evaluate_joint(peft_model, heads, eval_seqs, acc.device)
            heads.train()
            res.update(epoch=epoch + 1, step=step, train_loss=float(loss.item()), train_kl=float(kl.item()),
                       time=time.time())
            history.append(res)
            history_path.write_text(json.dumps(history, indent=1) + "\n")
            bar.write("eval epoch %d: top1 %s top5 %s | KL to the original %.4f, top-1 agreement %.3f" % (
                epoch + 1, " ".join(f"{a:.3f}" for a in res["top1"]), " ".join(f"{a:.3f}" for a in res["top5"]),
                res["kl"], res["agreement"]))
            save_checkpoint(ckpt_path, heads, peft_model, opt, sched, step)
        acc.wait_for_everyone()
    bar.close()

    # 6. Output: the adapter, then the heads, which record it and the tuned model's fingerprint.
    final = out / "heads"
    if acc.is_main_process:
        _save_adapter(peft_model, out / "adapter")
    changes = lora_changes(model)
    merged = peft_model.merge_and_unload().eval().requires_grad_(False)
    if backbone is not None:
        backbone.model = merged
    if acc.is_main_process:
        heads.eval()
        heads.cfg.adapter, heads.cfg.tuned_fingerprint = ADAPTER, tuned_fingerprint(merged, changes)
        heads.cfg.backbone, heads.cfg.backbone_fingerprint = bb.name, output_embedding_fingerprint(merged)
        heads.cfg.tree = None  # a tree calibrated for the stage-1 heads does not fit these
        if r.save_dtype != "float32":
            heads.to(getattr(torch, r.save_dtype))
        save_heads(heads, final)
        if j.merge:
            print(f"train: wrote {save_backbone(merged, tok, out / 'merged')} (the backbone with the adapter merged)")
        print(f"train: wrote {out / 'adapter'} (LoRA adapter) and {final} (heads; they load the adapter with them)")
    acc.wait_for_everyone()
    return final


def _save_adapter(peft_model, directory: Path) -> None:
    """peft's save_pretrained into a temporary folder, renamed into place."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
