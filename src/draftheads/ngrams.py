"""The backbone's own n-grams: for every context of 2..4 tokens that its distilled replies hold at least
twice, the token that most often came next and how often (its share of the context's occurrences).

Prompt lookup copies from the prompt and the reply so far; where they give fewer branches than it asks
for, the store drafts what the backbone wrote after the same few tokens on its training prompts (REST, He
et al. 2023, with counts instead of a suffix array): one greedy chain a step, continued while the product
of its tokens' shares stays at or above a floor. A small model's replies repeat their phrasing ("To find
the total ...", "Here is a Python function that"), which is what the store holds.

Layout: per n, the contexts packed into uint64 keys (`bits` per token, oldest token highest), sorted,
with the next token and its share at the same index; a lookup is one binary search per n tried.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import UserError

FILE = "ngrams.safetensors"  # in a heads directory: load() picks it up with the heads
FORMAT = "draftheads-ngrams/1"
MIN_NGRAM = 2  # one-token contexts are mostly noise in prose (as prompt lookup's min_ngram)
MIN_COUNT = 2  # a context seen once says little, and dropping those halves the file


def token_bits(vocab_size: int) -> int:
    return max(1, int(vocab_size - 1).bit_length())


class NgramStore:
    """tables: n -> (keys [E] uint64 sorted, next token [E] int64, share [E] float32)."""

    def __init__(self, tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], vocab_size: int,
                 meta: dict | None = None):
        self.tables, self.vocab_size = tables, vocab_size
        self.meta = meta or {}  # what `save` was given: the data, the backbone's fingerprint, the command
        self.bits = token_bits(vocab_size)
        self.max_ngram = max(tables) if tables else MIN_NGRAM

    @property
    def entries(self) -> int:
        return sum(len(t[0]) for t in self.tables.values())

    @classmethod
    def build(cls, sequences: Iterable[tuple[list[int], int]], vocab_size: int, max_ngram: int = 4,
              min_count: int = MIN_COUNT) -> NgramStore:
        """sequences: (ids, start) pairs: the contexts are every n tokens before a position >= start (a reply's
        tokens; the prompt before it is context only). max_ngram is cut to what a uint64 key holds."""
        if min_count < 1:
            raise UserError(f"min_count must be at least 1, not {min_count}")
        bits = token_bits(vocab_size)
        max_ngram = min(max_ngram, 64 // bits)
        if max_ngram < MIN_NGRAM:
            raise UserError(f"a vocabulary of {vocab_size} tokens leaves no room for {MIN_NGRAM}-token contexts")
        seqs = [(np.asarray(ids, dtype=np.int64), start) for ids, start in sequences]
        for ids, _ in seqs:
            if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                raise UserError(f"token ids outside the vocabulary of {vocab_size}: the data is another model's")
        tables = {}
        for n in range(MIN_NGRAM, max_ngram + 1):
            keys, nexts = [], []
            for ids, start in seqs:
                pos = np.arange(max(start, n), len(ids))  # predicted positions with n tokens before them
                if len(pos):
                    keys.append(_pack(np.stack([ids[pos - n + j] for j in range(n)], axis=1), bits))
                    nexts.append(ids[pos])
            if keys:
                tables[n] = _most_frequent(np.concatenate(keys), np.concatenate(nexts), min_count)
        return cls(tables, vocab_size)

    def next_token(self, context: list[int]) -> tuple[int, float] | None:
        """The longest stored suffix of `context` (n = max_ngram down to 2): (its next token, share), or None."""
        for n in range(min(self.max_ngram, len(context)), MIN_NGRAM - 1, -1):
            if n not in self.tables:
                continue
            key = 0
            for t in context[-n:]:
                key = (key << self.bits) | t
            keys, nxt, share = self.tables[n]
            i = int(np.searchsorted(keys, np.uint64(key)))
            if i < len(keys) and int(keys[i]) == key:
                return int(nxt[i]), float(share[i])
        return None

    def chain(self, context: list[int], tokens: int, min_prob: float) -> list[int]:
        """Up to `tokens` greedy next tokens after `context`, while the product of their shares >= min_prob."""
        ctx, out, prob = list(context[-self.max_ngram:]), [], 1.0
        while len(out) < tokens:
            found = self.next_token(ctx)
            if found is None or prob * found[1] < min_prob:
                break
            prob *= found[1]
            out.append(found[0])
            ctx = ctx[1:] + [found[0]] if len(ctx) == self.max_ngram else ctx + [found[0]]
        return out

    def save(self, path: str | Path, meta: dict) -> None:
        """safetensors, written to a temporary name and renamed (a killed write leaves no half file)."""
        from safetensors.numpy import save_file

        tensors = {}
        for n, (keys, nxt, share) in self.tables.items():
            tensors |= {f"keys.{n}": keys, f"next.{n}": nxt.astype(np.uint16 if self.bits <= 16 else np.int32),
                        f"share.{n}": share.astype(np.float16)}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "vocab_size": str(self.vocab_size),
                                               "meta": json.dumps(meta)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a package's data must be readable by all
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None) -> NgramStore:
        """The store at `path`; vocab_size: the backbone's, which the store's must equal."""
        found, meta = read_identity(path)
        if vocab_size is not None and found != vocab_size:
            raise UserError(f"{path} holds n-grams of a {found}-token vocabulary; the backbone has {vocab_size}")
        with _opened(path) as f:
            tables = {int(k.split(".")[1]): (f.get_tensor(k), f.get_tensor("next." + k.split(".")[1]).astype(np.int64),
                                              f.get_tensor("share." + k.split(".")[1]).astype(np.float32))
                      for k in f.keys() if k.startswith("keys.")}
        return cls(tables, found, meta)


def read_identity(path: str | Path) -> tuple[int, dict]:
    """(vocabulary size, what `save` was given) from the store's header, its tables left unread: whether a store
    fits a backbone is known before its megabytes are read."""
    with _opened(path) as f:
        md = f.metadata() or {}
    if md.get("format") != FORMAT:
        raise UserError(f"{path} is not an n-gram store ({FORMAT})")
    return int(md["vocab_size"]), json.loads(md.get("meta") or "{}")


@contextmanager
def _opened(path: str | Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read the n-gram store {path}: {e}") from None


def _pack(grams: np.ndarray, bits: int) -> np.ndarray:
    """grams [E, n] int64 -> keys [E] uint64, the first token highest."""
    key = np.zeros(len(grams), dtype=np.uint64)
    for j in range(grams.shape[1]):
        key = (key << np.uint64(bits)) | grams[:, j].astype(np.uint64)
    return key


def _most_frequent(keys: np.ndarray, nexts: np.ndarray, min_count: int):
    """Per distinct key seen >= min_count times: (key, its most frequent next token, that token's share)."""
    order = np.lexsort((nexts, keys))
    keys, nexts = keys[order], nexts[order]
    pair_start = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]) | (nexts[1:] != nexts[:-1])])
    pair_count = np.diff(np.r_[pair_start, len(keys)])
    pair_key, pair_next = keys[pair_start], nexts[pair_start]
    key_start = np.flatnonzero(np.r_[True, pair_key[1:] != pair_key[:-1]])
    total = np.add.reduceat(pair_count, key_start)
    best = np.maximum.reduceat(pair_count, key_start)
    group = np.repeat(np.arange(len(key_start)), np.diff(np.r_[key_start, len(pair_key)]))
    winner = np.zeros(len(key_start), dtype=np.int64)
    top = np.flatnonzero(pair_count == best[group])[::-1]  # reversed: on a tie the smallest token id is written last
    winner[group[top]] = pair_next[top]
    keep = total >= min_count
    return pair_key[key_start][keep], winner[keep], (best / total)[keep].astype(np.float32)
