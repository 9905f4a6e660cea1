"""The decoding loop: draft -> verify (one backbone forward over the whole tree) -> accept -> keep KV.

Without heads (or with a root-only tree) the same loop is plain autoregressive decoding, so the
baseline and the speculative path share every piece of machinery. Each step's tree comes from the
drafter (lookup.Hybrid): the configured tree of ranks, plus prompt-lookup branches when they match.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .acceptance import SamplingConfig, accept, sample
from .engine import Engine, TorchEngine
from .errors import UserError
from .lookup import Hybrid, PromptLookup
from .tree import Tree

ROOT_ONLY = Tree([])


@dataclass
class Stats:
    prompt_tokens: int = 0
    steps: int = 0  # verify passes after the prefill
    new_tokens: int = 0
    # tokens emitted per step, the backbone's own included; DraftModel cuts them to the tokens the reply
    # kept, so that new_tokens = 1 (the prefill's) + sum(accepted)
    accepted: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    accept_s: float = 0.0  # acceptance + KV compaction + bookkeeping
    total_s: float = 0.0
    tree_size: int = 1  # the configured tree's (ranked) nodes; prompt lookup adds nodes on steps that match
    nodes: int = 0  # nodes verified, summed over steps (steps x tree_size without lookup)
    # per step, whether each accepted draft was the lookup's (root's children first): lookup_accepted counts them
    # over the tokens each step kept, so a cut to the reply's tokens (DraftModel's) cuts the count too
    lookup_given: list[tuple[bool, ...]] = field(default_factory=list)

    def record(self, tree: Tree, nodes: list[int], draft_s: float, verify_s: float, accept_s: float) -> None:
        """One step: its tree, its accepted nodes (root first) and the seconds of its three phases."""
        self.steps += 1
        self.nodes += tree.size
        self.lookup_given.append(tuple(bool(tree.given[n]) for n in nodes[1:]))  # the root (node 0) is no draft
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.accept_s += accept_s
        self.accepted.append(len(nodes))  # the accepted drafts and the backbone's next token

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / max(len(self.accepted), 1)

    @property
    def lookup_accepted(self) -> int:
        """Accepted drafts whose token was given by prompt lookup (ranked by no head): a step's tokens are its
        accepted drafts, then the backbone's, so the kept ones are its first `accepted[i]`."""
        return sum(sum(g[:a]) for g, a in zip(self.lookup_given, self.accepted))

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("accepted", "lookup_given")}
        d.update(lookup_accepted=self.lookup_accepted, mean_accepted=self.mean_accepted,
                 tokens_per_second=self.tokens_per_second, accepted_histogram=_histogram(self.accepted))
        return d


def _histogram(values: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


class Decoder:
    """Runs the loop for one backbone (+ optional heads and prompt lookup). Batch size 1. The backbone's
    forwards go through `engine` (engine.py): by default a TorchEngine on `model`."""

    def __init__(self, model, heads=None, tree: Tree | None = None, lookup: PromptLookup | None = None,
                 engine: Engine | None = None, min_prob: float = 0.0):
        self.model, self.heads = model, heads
        self.engine = engine if engine is not None else TorchEngine(model)
        self.tree = tree if (tree is not None and heads is not None) else ROOT_ONLY
        # Each step verifies only the nodes of `tree` whose path the heads give at least this probability
        # (the heads' draft_confident; calibrate chose it with the tree where a row costs enough to skip
        # unlikely ones). 0, heads that cannot cut, or a tree named per call: every node.
        assert 0.0 <= min_prob < 1.0
        self.min_prob = min_prob if heads is not None and hasattr(heads, "draft_confident") else 0.0
        self.drafter = Hybrid(heads, lookup) if heads is not None or lookup is not None else None
        self.context, self.device, self.dtype = self.engine.context, self.engine.device, self.engine.dtype

    # The TorchEngine's lean forward and logits, which the batched step (batch.py) runs itself: None and
    # absent on other engines, so that they decode one request at a time.
    @property
    def lean(self):
        return getattr(self.engine, "lean", None)

    @lean.setter
    def lean(self, value) -> None:  # tests: None sends a Llama-family model down the generic path
        self.engine.lean = value

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.engine.logits(hidden)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    @torch.inference_mode()
    def steps(self, prompt_ids: list[int], max_new_tokens: int, sp: SamplingConfig, stats: Stats,
              tree: Tree | None = None, cache=None) -> Iterator[list[int]]:
        """Yield the tokens each step emits: first the prefill's token, then per step the accepted
        drafts plus the backbone's next token. The caller stops consuming on EOS/stop/limit.
        `cache` (tests: a kvcache.TreeKVCache) receives the KV entries; by default the engine makes one
        sized to the request."""
        min_prob = self.min_prob if tree is None else 0.0
        tree = self.tree if tree is None or self.heads is None else tree
        drafter = self.drafter
        if drafter is not None and drafter.heads is not None and tree.size == 1:
            # The heads draft nothing on a plain tree (calibrate may choose it beside the lookup): their state (Hydra++'s
            # prefix layer runs on every accepted token) would cost each step for nothing
            drafter = Hybrid(None, drafter.lookup) if drafter.lookup is not None else None
        prompt_len = len(prompt_ids)
        if prompt_len == 0:
            raise UserError("the prompt is empty")
        if prompt_len >= self.context:
            raise UserError(f"the prompt has {prompt_len} tokens but the model's context is {self.context}")
        reserve = drafter.max_size(tree) if drafter is not None else 1  # most nodes of a step
        capacity = min(self.context, prompt_len + max_new_tokens + reserve)
        engine = self.engine
        cache = cache or engine.new_cache(capacity)
        capacity = min(capacity, cache.capacity)
        gen = torch.Generator(device=self.device).manual_seed(sp.seed) if sp.seed is not None else None
        stats.prompt_tokens, stats.tree_size = prompt_len, tree.size
        dev = self.device

        t0 = self._sync()
        ids = torch.tensor(prompt_ids, device=dev)
        # Only Hydra++'s prefix layer reads every prompt position and the lookup none: an engine may skip rows.
        need = drafter.prompt_hidden if drafter is not None else "none"
        prompt_hidden, logits = engine.prefill(cache, ids, need)  # [P or fewer, hidden] (None: none), [vocab]
        hidden = prompt_hidden[-1] if prompt_hidden is not None else None  # [hidden_size]
        if drafter is not None:
            drafter.reset()  # drafters with state (Hydra++'s prefix layer, lookup's n-grams) start the sequence
            drafter.observe(prompt_hidden, ids)
        root = sample(logits, sp, gen)
        stats.prefill_s = self._sync() - t0
        yield [root]

        while cache.length + 1 <= capacity:
            L = cache.length
            t0 = self._sync()
            root_t = torch.tensor(root, device=dev)
            step_tree, cands = ROOT_ONLY, root_t.view(1)
            if drafter is not None and L + reserve <= capacity:  # the step's tree, ids [nodes] root first
                step_tree, cands = drafter.propose(hidden, root_t, tree, min_prob)
            t1 = self._sync()
            logits, h = engine.verify(cache, cands, step_tree)  # [nodes, vocab], [nodes, hidden_size]
            t2 = self._sync()
            nodes, root = accept(logits, cands, step_tree, sp, gen)
            engine.keep(cache, L, nodes)
            hidden = h[nodes[-1]]
            if drafter is not None:
                drafter.observe(h[nodes], cands[nodes])  # the accepted positions' hidden states and ids
            emitted = cands[nodes[1:]].tolist() + [root]
            t3 = self._sync()
            stats.record(step_tree, nodes, t1 - t0, t2 - t1, t3 - t2)
            yield emitted
