"""Conversations -> token ids + loss masks, and the per-head targets Medusa heads train on.

Alignment (the one thing that must be right): the backbone's hidden state at position t has read
tokens 0..t and its LM head predicts token t+1. Medusa head k (0-based) drafts one token further per
head, so its target at position t is token t+2+k. A target counts only when that token is an
assistant token (the loss mask), so heads learn the backbone's answers, never the prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from .shards import distilled_dir, fill_features, manifest_fingerprint, read_distilled

IGNORE = -100


def read_records(path: str | Path) -> list[dict]:
    """Records of a conversations JSONL file (torn or blank lines skipped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"conversations file not found: {path}")
    records = []
    for line in p.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a distill run still in progress
        if isinstance(rec, dict):
            records.append(rec)
    return records


def read_conversations(path: str | Path) -> list[list[dict]]:
    """`messages` lists of a JSONL file or distilled directory that have an assistant turn."""
    records = read_distilled(distilled_dir(path), features=False)[0] if Path(path).is_dir() else read_records(path)
    convs = [r["messages"] for r in records if _has_answer(r)]
    if not convs:
        raise UserError(f"{path}: no conversations with an assistant turn (expected JSONL of {{\"messages\": [...]}})")
    return convs


def _has_answer(rec: dict) -> bool:
    msgs = rec.get("messages")
    return bool(msgs) and any(m.get("role") == "assistant" and m.get("content") for m in msgs)


def load_training_data(path: str | Path, tok, max_length: int, fingerprint: str | None = None, fill=None,
                       shards: int | None = None):
    """Token streams, loss masks and stored hidden states of every usable conversation.

    Records from the batched distill engine carry the exact token stream the backbone generated (`ids`,
    `prompt_len`): those are used as they are, and a distilled directory also gives the backbone's hidden
    states at every position. Other records are rendered with the chat template (tokenize_conversation).
    `fill` = (hidden_of, progress): first compute the features a distilled directory lacks on this machine
    (a fresh clone has the shards, not their features), shard by shard, so a killed pass keeps its work.
    `shards` = N: a distilled directory's first N finished shards only.
    Returns ([(ids [T], mask [T])], [hidden [T, H] fp16 or None]).
    """
    if Path(path).is_dir():
        distilled_dir(path)
        made_by = manifest_fingerprint(path)
        if fingerprint and made_by and made_by != fingerprint:
            raise UserError(f"{path} was distilled from another backbone (output-embedding fingerprint {made_by}, "
                            f"this one {fingerprint}): distil again with this backbone")
        if fill:
            fill_features(path, fill[0], progress=fill[1], shards=shards)
        records, hidden = read_distilled(path, shards=shards)
    else:
        if shards is not None:
            raise UserError(f"--shards needs a distilled directory, and {path} is a file")
        records = read_records(path)
        hidden = [None] * len(records)
    seqs, kept = [], []
    for rec, h in zip(records, hidden):
        if not _has_answer(rec):
            continue
        if "ids" in rec:
            ids = torch.tensor(rec["ids"][:max_length], dtype=torch.long)
            mask = torch.arange(ids.shape[0]) >= rec["prompt_len"]
            h = h[:max_length] if h is not None else None
        else:
            ids, mask = tokenize_conversation(tok, rec["messages"], max_length)
            h = None
        seqs.append((ids, mask))
        kept.append(h)
    if not seqs:
        raise UserError(f"{path}: no conversations with an assistant turn (expected JSONL of {{\"messages\": [...]}})")
    return seqs, kept


def load_training_sets(paths: list[str], tok, max_length: int, eval_fraction: float, seed: int,
                       fingerprint: str | None = None, fill=None, shards: int | None = None):
    """load_training_data over several sources, each one's usable conversations (one target at least) split
    on its own, so that a held-out part does not change when another source is added (the data-size curve
    and earlier runs stay comparable). Returns (seqs, stored, train_idx, eval_idx, source) over their
    concatenation; source[i] is the path conversation i came from."""
    seqs, stored, train_idx, eval_idx, source = [], [], [], [], []
    for path in paths:
        s, h = load_training_data(path, tok, max_length, fingerprint, fill, shards)
        usable = [i for i, (_, mask) in enumerate(s) if mask[2:].any()]
        if len(usable) < 2:
            raise UserError(f"{path}: need at least 2 usable conversations, found {len(usable)}")
        tr, ev = split(len(usable), eval_fraction, seed)
        train_idx += [len(seqs) + i for i in tr]
        eval_idx += [len(seqs) + i for i in ev]
        seqs += [s[i] for i in usable]
        stored += [h[i] for i in usable]
        source += [path] * len(usable)
    return seqs, stored, train_idx, eval_idx, source


def tokenize_conversation(tok, messages: list[dict], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T] and loss mask [T] (True on assistant tokens, their end-of-turn token included).

    The chat template is rendered before and after each assistant message; the text in between is that
    message as the template writes it. Segments are tokenised separately, as in generation, where the
    prompt is encoded and the answer is the model's own token stream."""
    assert messages, "empty conversation"
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False) if i else ""
        after = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        if not before.startswith(done) or not after.startswith(before):
            raise UserError("the chat template does not render conversations incrementally; cannot mask assistant turns")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    ids, mask = [], []
    for text, is_asst in pieces:
        if text:
            t = tok(text, add_special_tokens=False)["input_ids"]
            ids += t
            mask += [is_asst] * len(t)
    return torch.tensor(ids[:max_length], dtype=torch.long), torch.tensor(mask[:max_length], dtype=torch.bool)


def head_targets(ids: torch.Tensor, mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """ids, mask [T] -> targets [T, num_heads]: token t+2+k where that token is an assistant token, else IGNORE."""
    assert ids.dim() == 1 and ids.shape == mask.shape
    T = ids.shape[0]
    out = torch.full((T, num_heads), IGNORE, dtype=torch.long)
    for k in range(num_heads):
        s = 2 + k  # head k: k+1 beyond the backbone's own next token (t+1)
        if T > s:
            out[:T - s, k] = torch.where(mask[s:], ids[s:], torch.full_like(ids[s:], IGNORE))
    return out


def split(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Conversation indices -> (train, held-out), seeded; at least one held-out when n > 1."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(max(1, round(n * eval_fraction)), n - 1) if n > 1 and eval_fraction > 0 else 0
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])
