"""The decoding loop: draft -> verify (one backbone forward over the whole tree) -> accept -> keep KV.

Without heads (or with a root-only tree) the same loop is plain autoregressive decoding, so the
baseline and the speculative path share every piece of machinery. Each step's tree comes from the
drafter (lookup.Hybrid): the configured tree of ranks, plus prompt-lookup branches when they match.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .acceptance import SamplingConfig, accept, sample
from .cpu_matmul import few_row_linear, linear
from .errors import UserError
from .families import context_length, logits_transform, probe, refusal
from .kvcache import TreeKVCache
from .llama_forward import LlamaForward, unsupported_reason
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
    lookup_accepted: int = 0  # accepted drafts whose token was given by prompt lookup (ranked by no head)

    def record(self, tree: Tree, nodes: list[int], draft_s: float, verify_s: float, accept_s: float) -> None:
        """One step: its tree, its accepted nodes (root first) and the seconds of its three phases."""
        self.steps += 1
        self.nodes += tree.size
        self.lookup_accepted += sum(tree.given[n] for n in nodes)
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.accept_s += accept_s
        self.accepted.append(len(nodes))  # the accepted drafts and the backbone's next token

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / max(len(self.accepted), 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "accepted"}
        d.update(mean_accepted=self.mean_accepted, tokens_per_second=self.tokens_per_second,
                 accepted_histogram=_histogram(self.accepted))
        return d


def _histogram(values: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


class Decoder:
    """Runs the loop for one backbone (+ optional heads and prompt lookup). Batch size 1."""

    def __init__(self, model, heads=None, tree: Tree | None = None, lookup: PromptLookup | None = None):
        self.model, self.heads = model, heads
        self.tree = tree if (tree is not None and heads is not None) else ROOT_ONLY
        self.drafter = Hybrid(heads, lookup) if heads is not None or lookup is not None else None
        self.body = model.base_model  # decoder stack: ids -> final-norm hidden states
        self.lm_head = model.get_output_embeddings()
        self.finish_logits = logits_transform(model)  # softcapping / logit scale the model applies, or None
        self.context = context_length(model.config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.fast_linear = True  # generic path: few-row matmuls through cpu_matmul (CPU fp32); False: stock
        # Llama-family models take the lean forward; None: transformers' own forward (the generic path).
        self.lean = LlamaForward(model) if unsupported_reason(model) is None else None
        self._refuse_inexact()

    def _refuse_inexact(self) -> None:
        """Refuse, in one line, a backbone this loop would decode wrongly. The lean forward is tested
        against transformers for each family it takes; the generic path is probed on a tiny tree step."""
        reason = refusal(self.model) or (probe(self) if self.lean is None else None)
        if reason:
            raise UserError(f"draftheads cannot decode {self.model.config.model_type} exactly: {reason}")

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _kernels(self, rows: int):
        # Entered per forward, never across a yield: a torch function mode is global to the thread.
        # One-row forwards skip it: nothing to gain, and the mode's per-op dispatch costs ~2 ms.
        mode = few_row_linear(self.device) if self.fast_linear and rows > 1 else None
        return mode if mode is not None else contextlib.nullcontext()

    def _forward(self, cache: TreeKVCache, ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor,
                 verify: bool = True):
        """ids, positions [q] -> hidden [q, hidden_size]; appends q entries to the cache. The generic
        path's prefill (verify=False) runs stock kernels, as transformers' own prefill does."""
        if self.lean is not None:
            mask = cache.attention_mask(bias) if ids.numel() > 1 else None  # one token sees all the cache
            return self.lean.hidden(cache, ids, positions, mask)
        mask = cache.attention_mask(bias, positions)  # a dict of masks by layer type for mixed models
        with self._kernels(ids.numel() if verify else 1):
            out = self.body(input_ids=ids.view(1, -1), position_ids=positions.view(1, -1), attention_mask=mask,
                            past_key_values=cache.hf, use_cache=True)
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden_size] -> logits [..., vocab], with whatever the model applies after its
        output embedding (softcapping, logit scale), so that `exact` samples the model's distribution."""
        # Only a plain Linear's weight is its matrix: a quantised or adapter-wrapped subclass is not.
        if self.fast_linear and type(self.lm_head) is torch.nn.Linear:
            logits = linear(hidden, self.lm_head.weight, self.lm_head.bias)
        else:
            logits = self.lm_head(hidden)
        return logits if self.finish_logits is None else self.finish_logits(logits)

    @torch.inference_mode()
    def steps(self, prompt_ids: list[int], max_new_tokens: int, sp: SamplingConfig, stats: Stats,
              tree: Tree | None = None, cache: TreeKVCache | None = None) -> Iterator[list[int]]:
        """Yield the tokens each step emits: first the prefill's token, then per step the accepted
        drafts plus the backbone's next token. The caller stops consuming on EOS/stop/limit.
        `cache` (tests) receives the KV entries; by default one sized to the request is made."""
        tree = self.tree if tree is None or self.heads is None else tree
        prompt_len = len(prompt_ids)
        if prompt_len == 0:
            raise UserError("the prompt is empty")
        if prompt_len >= self.context:
            raise UserError(f"the prompt has {prompt_len} tokens but the model's context is {self.context}")
        reserve = self.drafter.max_size(tree) if self.drafter is not None else 1  # most nodes of a step
        capacity = min(self.context, prompt_len + max_new_tokens + reserve)
        cache = cache or TreeKVCache.for_model(self.model, capacity)
        capacity = min(capacity, cache.capacity)
        gen = torch.Generator(device=self.device).manual_seed(sp.seed) if sp.seed is not None else None
        stats.prompt_tokens, stats.tree_size = prompt_len, tree.size
        dev = self.device

        t0 = self._sync()
        ids = torch.tensor(prompt_ids, device=dev)
        causal = torch.full((prompt_len, prompt_len), torch.finfo(self.dtype).min, dtype=self.dtype, device=dev).triu(1)
        prompt_hidden = self._forward(cache, ids, torch.arange(prompt_len, device=dev), causal, verify=False)  # [P, hidden]
        hidden = prompt_hidden[-1]  # [hidden_size]
        if self.drafter is not None:
            self.drafter.reset()  # drafters with state (Hydra++'s prefix layer, lookup's n-grams) start the sequence
            self.drafter.observe(prompt_hidden, ids)
        root = sample(self.logits(hidden), sp, gen)
        stats.prefill_s = self._sync() - t0
        yield [root]

        while cache.length + 1 <= capacity:
            L = cache.length
            t0 = self._sync()
            root_t = torch.tensor(root, device=dev)
            step_tree, cands = ROOT_ONLY, root_t.view(1)
            if self.drafter is not None and L + reserve <= capacity:  # the step's tree, ids [nodes] root first
                step_tree, cands = self.drafter.propose(hidden, root_t, tree)
            tt = step_tree.tensors(dev, self.dtype)  # built once per tree shape
            t1 = self._sync()
            h = self._forward(cache, cands, tt.depths + L, tt.tree_bias)  # [nodes, hidden_size]
            logits = self.logits(h)  # [nodes, vocab]
            t2 = self._sync()
            nodes, root = accept(logits, cands, step_tree, sp, gen)
            cache.keep(nodes, L)
            hidden = h[nodes[-1]]
            if self.drafter is not None:
                self.drafter.observe(h[nodes], cands[nodes])  # the accepted positions' hidden states and ids
            emitted = cands[nodes[1:]].tolist() + [root]
            t3 = self._sync()
            stats.record(step_tree, nodes, t1 - t0, t2 - t1, t3 - t2)
            yield emitted
