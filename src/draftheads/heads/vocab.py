"""VocabTrim: heads predict only the N tokens the backbone itself emits most often.

On a small backbone a full LM head per head costs as much as the backbone (49,152 x 576 per head on
SmolLM2-135M); the kept ids are stored with the heads as `vocab_map` (trimmed id -> full id), and
`MedusaHeads.draft` maps drafts back to full ids.
"""

from __future__ import annotations

import torch

IGNORE = -100


def count_tokens(sequences, vocab_size: int) -> torch.Tensor:
    """Counts [vocab_size] of token ids over an iterable of (ids [T], mask [T]) pairs, masked positions only."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, mask in sequences:
        counts += torch.bincount(ids[mask], minlength=vocab_size)[:vocab_size]
    return counts


def build_vocab_map(counts: torch.Tensor, n: int, always: list[int] = ()) -> torch.Tensor:
    """The n most frequent ids (ties: lower id first), plus `always` (e.g. EOS), sorted ascending -> [n]."""
    assert counts.dim() == 1 and 0 < n <= counts.shape[0]
    score = counts.double().clone()
    for t in always:
        score[t] = float("inf")  # the end-of-turn token must be draftable whatever its count
    # Stable descending sort keeps lower ids first among equal counts, so the map is deterministic.
    order = torch.sort(-score, stable=True).indices[:n]
    return order.sort().values


def full_to_trimmed(vocab_map: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Lookup table [vocab_size]: trimmed id of each full id, IGNORE where the id was trimmed away."""
    table = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    table[vocab_map] = torch.arange(vocab_map.shape[0])
    return table


def trim_targets(targets: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Full-id targets (any shape, IGNORE allowed) -> trimmed ids; ids outside the map become IGNORE."""
    out = targets.clone()
    valid = targets != IGNORE
    out[valid] = table[targets[valid]]
    return out
