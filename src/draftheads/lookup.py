"""Prompt lookup (draft the tokens that followed an earlier occurrence of the context's last n-gram,
as transformers' `prompt_lookup_num_tokens` does) and the hybrid that verifies its branches together
with the heads' tree in one forward.

Matching: the context is the prompt, the tokens accepted so far and the step's root (the backbone's
own next token). For n from `max_ngram` down to `min_ngram`, every earlier occurrence of the context's
last n tokens, most recent first, offers the `tokens` that followed it; distinct continuations become
branches, longest match first, up to `branches`. No match: no branch, and the step verifies the heads'
tree alone (no extra node, no extra cost). With an n-gram store (ngrams.py: what the backbone wrote after
the same few tokens in its distilled replies), a step with fewer than `branches` matches takes the store's
chain as one more branch.

The step's tree: branches hang from the root as chains of given tokens (tree.py), merged as a trie. A
branch whose first tokens are those of existing nodes (the heads' or an earlier branch's) follows them
and hangs only its remaining tokens below, so siblings never hold the same token. The acceptance rules
then work unchanged: greedy follows the one child holding the backbone's token, which yields the longest
accepted path over heads and lookup together; `exact` stays exact, since every proposal is a function
of the context alone and siblings are distinct (acceptance.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import islice

import torch

from .errors import UserError
from .tree import MAX_RANK, Tree

SCAN = 64  # occurrences looked at per n-gram length: enough to find `branches` distinct continuations


@dataclass(frozen=True)
class LookupConfig:
    max_ngram: int = 3  # longest suffix matched
    min_ngram: int = 2  # shortest; one-token matches are mostly noise in prose
    # distinct continuations per step. One: a second copy (and the store's chain beside a copy) cost more rows than
    # they brought. On training-side prompts (stop 61, scripts/compare_store.py, 128 tokens, this EPYC) 2 -> 1 took
    # nodes a step 3.84 -> 3.30 and 3.88 -> 3.36, accepted 1.88 -> 1.82 and 1.95 -> 1.90, tokens/s 1.024x and 1.036x
    # (20 and 40 prompts)
    branches: int = 1
    tokens: int = 5  # tokens per continuation
    # The n-gram store's chain (where the backbone has one: draftmodel.ngram_store): most tokens (0: off; `tokens` caps it as it
    # caps every branch), and the product of their shares it keeps to. On 76 training-side prompts (stop 58,
    # docs/training.md) the store took accepted 1.95 -> 2.33 and tokens/s 1.08x at 4 / 0.35; 2-3 tokens and
    # floors 0.2-0.5 came within 2% of it
    store_tokens: int = 4
    store_min_prob: float = 0.35

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram or self.branches < 1 or self.tokens < 1:
            raise UserError("lookup settings need 1 <= min_ngram <= max_ngram, branches >= 1, tokens >= 1, "
                            f"not {asdict(self)}")
        if self.store_tokens < 0 or not 0.0 <= self.store_min_prob <= 1.0:
            raise UserError("lookup settings need store_tokens >= 0 and 0 <= store_min_prob <= 1, "
                            f"not {asdict(self)}")


def lookup_config(spec) -> LookupConfig | None:
    """`lookup=` of load(): None or False (off), True (the default settings), a dict of LookupConfig
    fields or a LookupConfig."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return LookupConfig()
    if isinstance(spec, LookupConfig):
        return spec
    if isinstance(spec, dict):
        try:
            return LookupConfig(**spec)
        except TypeError as e:
            raise UserError(f"lookup settings: {e}") from None
    raise UserError(f"lookup must be True, False, a dict or a LookupConfig, not {spec!r}")


class PromptLookup:
    """The n-gram drafter. Of the drafter contract it implements reset, observe and teacher_topk; its
    draft is `branches(root)`: token lists, not one token per node of a tree of ranks. store: the backbone's
    n-gram store (ngrams.NgramStore, read only, shared by every sequence) or None."""

    def __init__(self, cfg: LookupConfig | None = None, store=None):
        self.cfg, self.store = cfg or LookupConfig(), store
        self.reset()

    @property
    def max_nodes(self) -> int:
        """Most nodes the branches add to a step's tree."""
        return self.cfg.branches * self.cfg.tokens

    def reset(self) -> None:
        self.context: list[int] = []
        # per n: n-gram -> positions just after each of its occurrences in the context, in order; it covers
        # context[:indexed] (observe only appends: a batched round that drafts no branches pays nothing for them)
        self.index: dict[int, dict[tuple[int, ...], list[int]]] = {
            n: {} for n in range(self.cfg.min_ngram, self.cfg.max_ngram + 1)}
        self.indexed = 0

    def observe(self, hidden: torch.Tensor | None, ids) -> None:
        """Tokens [a] newly in the context (the prompt after prefill, each step's accepted path); the
        hidden states are not used."""
        self.context += ids.tolist() if isinstance(ids, torch.Tensor) else [int(t) for t in ids]

    def _catch_up(self) -> None:
        """Index the n-grams that end in the context's tokens observed since the last call."""
        ctx = self.context
        for end in range(self.indexed + 1, len(ctx) + 1):
            for n, index in self.index.items():
                if end >= n:
                    index.setdefault(tuple(ctx[end - n:end]), []).append(end)
        self.indexed = len(ctx)

    def branches(self, root: int) -> list[list[int]]:
        """Continuations of context + [root]: longest n-gram first, most recent occurrence first, each
        distinct and no prefix of one taken before; at most cfg.branches of cfg.tokens tokens each. Fewer
        than cfg.branches: the store's chain after context + [root] is one more, unless it is a prefix of one."""
        out = self._copies(root)
        if self.store is not None and len(out) < self.cfg.branches and self.cfg.store_tokens:
            chain = self.store.chain(self.context[-self.store.max_ngram:] + [root],
                                     min(self.cfg.store_tokens, self.cfg.tokens), self.cfg.store_min_prob)
            if chain and not any(b[:len(chain)] == chain for b in out):
                out.append(chain)
        return out

    def _copies(self, root: int) -> list[list[int]]:
        self._catch_up()
        ctx, k, out = self.context, self.cfg.tokens, []
        for n in range(self.cfg.max_ngram, self.cfg.min_ngram - 1, -1):
            if len(ctx) < n - 1:
                continue
            suffix = tuple(ctx[len(ctx) - n + 1:]) + (root,)
            for p in islice(reversed(self.index[n].get(suffix, ())), SCAN):
                cont = ctx[p:p + k]
                # Past the context's end the copy goes on into the root and then into itself, as an
                # overlapping copy does: after "x y x y x" + root "y", (y x y) continues "x y x y x".
                while len(cont) < k:
                    j = p + len(cont) - len(ctx)
                    cont.append(root if j == 0 else cont[j - 1])  # seq = ctx + [root] + cont; cont[i] = seq[p + i]
                if not any(b[:len(cont)] == cont for b in out):
                    out.append(cont)
                    if len(out) == self.cfg.branches:
                        return out
        return out

    def teacher_topk(self, hidden: torch.Tensor, ids: torch.Tensor, n: int = MAX_RANK) -> torch.Tensor:
        """ids [T] of a whole sequence -> [K, T, n] with K = cfg.tokens: at position t (context ids[:t+1],
        root ids[t+1]) column r holds branch r's tokens, -1 where there is none. Heads' rank r at depth k
        is branch r's k-th token here; a branch is accepted along its own column only. What `calibrate`
        measures; `hidden` is not used."""
        seq, K = ids.tolist(), self.cfg.tokens
        out = torch.full((K, len(seq), n), -1, dtype=torch.long)
        probe = PromptLookup(self.cfg, self.store)
        for t in range(len(seq) - 1):
            probe.observe(None, seq[t:t + 1])
            for r, branch in enumerate(probe.branches(seq[t + 1])[:n]):
                out[:len(branch), t, r] = torch.tensor(branch)
        return out.to(ids.device)


def hang(tree: Tree, ids: list[int], branches: list[list[int]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Merge branches (token lists continuing the root) into `tree`, whose nodes hold `ids`, as a trie:
    follow existing nodes while the tokens agree, add the rest as given nodes. Returns the new nodes'
    paths (tree.py: -1 - j is the j-th given child of its parent) and their tokens."""
    paths: list[tuple[int, ...]] = [()] + tree.paths  # by node; new nodes are appended
    child = {(tree.parent[i], ids[i]): i for i in range(1, tree.size)}
    given_children: dict[int, int] = {}
    new, tokens = [], []
    for branch in branches:
        node = 0
        for t in branch:
            nxt = child.get((node, t))
            if nxt is None:
                given_children[node] = j = given_children.get(node, 0) + 1
                nxt = child[(node, t)] = len(paths)
                paths.append(paths[node] + (-j,))
                new.append(paths[nxt])
                tokens.append(t)
            node = nxt
    return new, tokens


class Hybrid:
    """What the loop drafts with: heads (a tree of ranks), prompt lookup (branches of given tokens), or
    both (either may be None). `propose` returns the step's tree and its ids; the loop and acceptance
    see only those. `Hybrid(heads, None)` is the heads alone, with the configured tree every step."""

    def __init__(self, heads=None, lookup: PromptLookup | None = None):
        self.heads, self.lookup = heads, lookup

    def max_size(self, tree: Tree) -> int:
        """Most nodes a step's tree can have on the ranked tree `tree` (the loop sizes its cache by it)."""
        return tree.size + (self.lookup.max_nodes if self.lookup is not None else 0)

    @property
    def prompt_hidden(self) -> str:
        """Which prompt positions' hidden states the drafters read (what an engine's prefill must return):
        "all" for Hydra++'s prefix layer, "last" for other heads (they draft from it), "none" for the
        lookup alone (it reads ids only)."""
        if self.heads is None:
            return "none"
        return "all" if getattr(self.heads, "prefix", None) is not None else "last"

    def reset(self) -> None:
        for drafter in (self.heads, self.lookup):
            if drafter is not None:
                drafter.reset()

    def observe(self, hidden: torch.Tensor, ids: torch.Tensor) -> None:
        """hidden [a, H] and ids [a] of the newly accepted positions."""
        if self.heads is not None:
            self.heads.observe(hidden, ids)
        if self.lookup is not None:
            self.lookup.observe(hidden, ids)

    def propose(self, hidden: torch.Tensor, root: torch.Tensor, tree: Tree, min_prob: float = 0.0,
                max_nodes: int | None = None) -> tuple[Tree, torch.Tensor]:
        """hidden [H] at the last verified position, root 0-d, `tree` the ranked tree -> (the step's tree,
        ids [its size], root first). Without a lookup match the step's tree is `tree` itself, or with
        `min_prob` > 0 its nodes whose path the heads give at least that probability (draft_confident).
        max_nodes: the most nodes the step's tree may have (a batched pass's share of rows): lookup's branches
        are cut to fit, the first (longest match) kept before the next; the heads' tree is never cut here."""
        if self.heads is None or tree.size == 1:
            ids = root.view(1)
        elif min_prob > 0:
            tree, ids = self.heads.draft_confident(hidden[None], root.view(1), tree, min_prob)[0]
        else:
            ids = self.heads.draft(hidden, root, tree)
        branches = self.lookup.branches(int(root)) if self.lookup is not None else []
        drafted = ids.tolist() if branches else []
        given, tokens = hang(tree, drafted, branches) if branches else ([], [])
        if max_nodes is not None:  # hang lists a branch's nodes parent first: any prefix of them is a tree
            room = max(max_nodes - tree.size, 0)
            given, tokens = given[:room], tokens[:room]
        if not given:
            return tree, ids
        step = tree.with_given(given)
        order = sorted(range(len(given)), key=lambda i: step.index[given[i]])
        return step, torch.tensor(drafted + [tokens[i] for i in order], device=ids.device)  # one op: cat's two cost ~10 us
