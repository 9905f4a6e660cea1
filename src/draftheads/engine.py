"""What the decoding loop asks of a backbone: the verify engine.

The loop (generate.Decoder) drafts, accepts and keeps the statistics; an engine runs the backbone.
Per sequence it makes a cache (`new_cache`), prefills the prompt, verifies each step's tree of
candidate tokens in ONE pass (every node sees the cached prefix and its own tree ancestors, at
position length + depth) and then keeps only the accepted path in its cache. Two engines exist:

- TorchEngine (here): the transformers model, through the lean forward for Llama-family backbones
  (llama_forward.py) or the model's own forward; its cache is kvcache.TreeKVCache, the one module that
  knows transformers' cache layout.
- engine_llamacpp.LlamaCppEngine: a GGUF on llama.cpp's kernels, whose tree masking is llama.cpp's own
  sequence masking (each node belongs to the sequence of every leaf below it).

Acceptance, drafting, trees and statistics never know which engine ran.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from .cpu_matmul import ROW_EXACT_DTYPES, few_row_linear, linear, routes
from .errors import UserError
from .families import context_length, logits_transform, probe, refusal
from .kvcache import PromptCache, TreeKVCache, cache_keyword
from .llama_forward import LlamaForward, unsupported_reason
from .tree import Tree


class Engine(Protocol):
    """The contract. Tensors are on `device`; hidden states are the final-norm states the heads read."""

    context: int  # tokens one sequence may hold (prompt + reply + one tree)
    device: torch.device
    dtype: torch.dtype  # of the hidden states it returns (the heads run in it)

    def new_cache(self, capacity: int):
        """An empty cache for one sequence of at most `capacity` tokens; `.length` counts its entries."""

    def prefill(self, cache, ids: torch.Tensor, hidden: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """ids [P] into an empty cache -> (hidden states, logits [vocab] after the last prompt token).
        hidden: "all" (rows [P, H]), "last" (at least the last row) or "none" (None allowed): what the
        drafters read (lookup.Hybrid.prompt_hidden)."""

    def verify(self, cache, ids: torch.Tensor, tree: Tree) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [N] (tree.size, root first) after the cache's L entries -> (logits [N, vocab], hidden [N, H]).
        The cache then holds the N nodes too, until `keep`. Both may be views of the engine's buffers,
        valid until its next call: the loop reads them within the step."""

    def keep(self, cache, start: int, nodes: list[int]) -> None:
        """After a verify at `start`: keep `nodes` (root first, each a child of the previous) as entries
        start.. start + len(nodes) - 1, and drop every other node."""

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] of a whole sequence -> hidden [T, H], outside any cache (calibration)."""


class TorchEngine:
    """A transformers causal LM as the engine: the lean forward where it applies, else the model's own
    forward with our masks (probed at load); tensors stay where the model is."""

    def __init__(self, model):
        self.model = model
        self.body = model.base_model  # decoder stack: ids -> final-norm hidden states
        self._cache_kw = cache_keyword(self.body)
        self.lm_head = model.get_output_embeddings()
        self.finish_logits = logits_transform(model)  # softcapping / logit scale the model applies, or None
        self.context = context_length(model.config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.fast_linear = True  # generic path: few-row matmuls through cpu_matmul (CPU fp32); False: stock
        # Llama-family models take the lean forward (fused on a CPU in fp32: LlamaForward.shared); None:
        # transformers' own forward (the generic path).
        self.lean = LlamaForward.shared(model) if unsupported_reason(model) is None else None
        # Reduced precision on a CPU: a tree pass's rows must each compute what a plain step computes, bit for
        # bit, or output changes (bf16 logits tie often): each node's attention runs alone (LlamaForward).
        self.row_exact = self.device.type == "cpu" and self.dtype in ROW_EXACT_DTYPES
        # Recent prompts' keys, so that a prompt sharing their start prefills only the rest (use_prompt_cache;
        # the server's --prompt-cache-tokens). None: every prompt prefilled whole.
        self.prompt_cache: PromptCache | None = None
        self._refuse_inexact()

    def _refuse_inexact(self) -> None:
        """Refuse, in one line, a backbone this loop would decode wrongly. The lean forward is tested
        against transformers for each family it takes; the generic path is probed on a tiny tree step."""
        reason = refusal(self.model) or (self._inexact_rows() or probe(self) if self.lean is None else None)
        if reason:
            raise UserError(f"draftheads cannot decode {self.model.config.model_type} exactly: {reason}")

    def _inexact_rows(self) -> str | None:
        # transformers' attention over a tree's rows rounds differently from a one-token step; in reduced
        # precision that flips near-tied greedy tokens (tiny Qwen3, OLMo-2, Gemma, Phi, GPT-NeoX in bf16: 1-6
        # of 12 replies changed). Only the lean forward attends row by row (row_exact).
        if self.row_exact:
            return (f"in {str(self.dtype).removeprefix('torch.')} on a CPU its tree rows would round differently "
                    "from one-token steps and change greedy output (only Llama, Mistral and Qwen2 attend row by "
                    "row); load it in float32")
        return None

    def _kernels(self, rows: int):
        # Entered per forward, never across a yield: a torch function mode is global to the thread.
        # One-row forwards take it only where the C++ kernel serves one row: the mode's per-op dispatch
        # costs ~2 ms a forward, about what the padded product saves over MKL's one-row GEMV.
        one_row = self.device.type == "cpu" and self.dtype == torch.float32 and routes().get(1) == "rows"
        mode = few_row_linear(self.device) if self.fast_linear and (rows > 1 or one_row) else None
        return mode if mode is not None else contextlib.nullcontext()

    def _forward(self, cache: TreeKVCache, ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor,
                 verify: bool = True, tree: Tree | None = None):
        """ids, positions [q] -> hidden [q, hidden_size]; appends q entries to the cache. The generic
        path's prefill (verify=False) runs stock kernels, as transformers' own prefill does. tree: the
        verified tree, whose rows the lean forward attends one by one where `row_exact` asks for it."""
        if self.lean is not None:
            if tree is not None and self.row_exact:  # plain steps too: every row takes the same call
                return self.lean.hidden(cache, ids, positions, None, {0: tuple(tree.parent)})
            mask = cache.attention_mask(bias) if ids.numel() > 1 else None  # one token sees all the cache
            return self.lean.hidden(cache, ids, positions, mask)
        mask = cache.attention_mask(bias, positions)  # a dict of masks by layer type for mixed models
        with self._kernels(ids.numel() if verify else 1):
            out = self.body(input_ids=ids.view(1, -1), position_ids=positions.view(1, -1), attention_mask=mask,
                            use_cache=True, **{self._cache_kw: cache.hf})
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

    # ---------------------------------------------------------------- the Engine contract

    def new_cache(self, capacity: int) -> TreeKVCache:
        return TreeKVCache.for_model(self.model, capacity, self.lean.kv_dtype if self.lean is not None else None)

    def use_prompt_cache(self, max_tokens: int) -> str | None:
        """Keep up to `max_tokens` tokens of recent prompts (PromptCache; 0: off). Returns why it stays off
        (a row-exact engine, whose prompts must prefill whole as a lone request's do), or None."""
        if max_tokens and self.row_exact:
            return (f"{str(self.dtype).removeprefix('torch.')} on a CPU prefills every prompt whole, so that a reply "
                    "equals the same request alone")
        self.prompt_cache = PromptCache(max_tokens) if max_tokens else None
        return None

    def prefill(self, cache: TreeKVCache, ids: torch.Tensor, hidden: str = "all"):
        # Every row's hidden state is computed on the way anyway: all of them are returned, whatever `hidden` says.
        P, prompts = ids.numel(), self.prompt_cache
        key = ids.tolist() if prompts is not None else None  # the cache's key (a device sync on a GPU: once)
        done = prompts.restore(cache, key) if prompts is not None else None  # [m, H]: a cached start
        m = 0 if done is None else done.shape[0]
        if self.lean is not None:  # in pieces the packed kernel takes (LlamaForward.prefill_rows)
            hidden = self.lean.prefill_span(cache, ids, m, P)  # [P - m, H]
        else:
            causal = torch.full((P - m, P - m), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device).triu(1)
            hidden = self._forward(cache, ids[m:], torch.arange(m, P, device=self.device), causal, verify=False)  # [P - m, H]
        if done is not None:
            hidden = torch.cat([done, hidden])  # [P, H]
        if prompts is not None:
            prompts.store(key, cache, hidden)
        return hidden, self.logits(hidden[-1])

    def verify(self, cache: TreeKVCache, ids: torch.Tensor, tree: Tree):
        tt = tree.tensors(self.device, self.dtype)  # built once per tree shape
        hidden = self._forward(cache, ids, tt.depths + cache.length, tt.tree_bias, tree=tree)  # [N, H]
        return self.logits(hidden), hidden

    def keep(self, cache: TreeKVCache, start: int, nodes: list[int]) -> None:
        cache.keep(nodes, start)

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids=ids.view(1, -1)).last_hidden_state[0]
