"""Hydra heads: each head also sees the tokens drafted before it on the tree path (Ankner et al. 2024).

Head k (0-based) drafts the token k+2 positions after the last verified one, like Medusa head k, but
its input is the concatenation [h, E(x1), ..., E(x_{k+1})]: the backbone's last hidden state h and the
frozen input embeddings E of the path so far, x1 being the root (the backbone's own next token). So
drafting runs depth by depth: one batched call of head d-1 over every node at depth d-1 that has
children. A head is ResBlock(in -> H, learned residual projection) + (L-1) ResBlock(H -> H) and an LM
head (own, shared or VocabTrim-trimmed, as for Medusa).

Hydra++ (`prefix_layer=True`) adds one Llama decoder layer over the sequence of the backbone's hidden
states; its output at the last verified position replaces h. It keeps a KV cache of its own that only
ever holds accepted positions (`observe`), so it needs no tree mask and no rollback. Hydra++ is
trained against the backbone's own distributions (teacher loss) with dropout.

With `prefix_token` the prefix layer reads fc([h_t, E(x_{t+1})]) at each position t, the hidden state with the
token it produced (EAGLE's pairing), so its attention can look back with the root in hand. The last verified
position's token is the root, known only when drafting: that position waits (`_pending`) and `draft` adds it to
the cache with the root, which the next `observe` then finds there (node 0, the root, is always accepted).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from .. import few_rows
from ..cpu_matmul import packed_rows
from ..defaults import GROUNDED_RESIDUALS
from ..kvcache import TreeKVCache
from ..llama_forward import LlamaForward
from ..tree import MAX_RANK, Tree
from ..weight_state import WeightState
from .medusa import DraftHeads, HeadsConfig, ResBlock, linear, top_probs


class GroundedBlock(nn.Module):
    """The first block of a head: in_dim -> hidden. The residual path is a learned projection of the whole
    input (Hydra's ResBlock, residual="projection") or the hidden-state slice h itself (residual="hidden"),
    which halves the head's parameters: the SiLU branch still sees the whole input."""

    def __init__(self, in_dim: int, hidden: int, residual: str):
        super().__init__()
        assert residual in GROUNDED_RESIDUALS, residual
        self.hidden = hidden
        self.linear = nn.Linear(in_dim, hidden)
        nn.init.zeros_(self.linear.weight)
        self.res = nn.Linear(in_dim, hidden, bias=False) if residual == "projection" else None
        if self.res is not None:
            # Start as "h" (the hidden-state slice of the input): an untrained head then drafts what the
            # backbone's own LM head would, as Medusa's near-identity blocks do.
            nn.init.zeros_(self.res.weight)
            with torch.no_grad():
                self.res.weight[:, :hidden].copy_(torch.eye(hidden))

    def forward(self, x):
        res = x[..., :self.hidden] if self.res is None else linear(x, self.res.weight)
        return res + nn.functional.silu(linear(x, self.linear.weight, self.linear.bias))


def prefix_layer_config(cfg: HeadsConfig) -> LlamaConfig:
    h = cfg.hidden_size
    heads = max(1, h // 64)
    return LlamaConfig(vocab_size=1, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1 << 16,
                       rms_norm_eps=1e-5, attn_implementation="sdpa", bos_token_id=None, eos_token_id=None,
                       pad_token_id=None)


class HydraHeads(DraftHeads):
    def __init__(self, cfg: HeadsConfig):
        assert cfg.head_type in ("hydra", "hydra++"), cfg.head_type
        super().__init__(cfg)
        H = cfg.hidden_size
        self.blocks = nn.ModuleList(
            nn.Sequential(GroundedBlock(H * (k + 2), H, cfg.grounded_residual),
                          *[ResBlock(H) for _ in range(cfg.num_layers - 1)])
            for k in range(cfg.num_heads))
        self.prefix = LlamaModel(prefix_layer_config(cfg)) if cfg.head_type == "hydra++" else None
        self.fuse = None  # [h, E(next token)] -> the prefix layer's input
        if cfg.prefix_token:
            self.fuse = nn.Linear(2 * H, H)
            with torch.no_grad():  # starts as h alone: an untrained fuse leaves Hydra++ as it was
                self.fuse.weight.zero_()
                self.fuse.weight[:, :H].copy_(torch.eye(H))
                self.fuse.bias.zero_()
        self.dropout = nn.Dropout(cfg.dropout)
        self.embed_weight: torch.Tensor | None = None  # [vocab, H] the backbone's input embedding (frozen)
        # The prefix layer at decode time: LlamaForward's code on its weights (observing 2 positions after
        # 200: 0.55 against 1.06 ms through transformers' forward, fp32, 2 threads: scripts/
        # time_hydra_observe.py), q/k/v and gate/up fused (at their first decode: with weights of Q8_0 values,
        # round_drafter_weights', the whole layer is then one call to the C++ decoder stack); its cache holds
        # accepted positions only.
        self._lean = LlamaForward(self.prefix, fuse=True) if self.prefix is not None else None
        assert self.prefix is None or len(self.prefix.layers) == 1, "observe relies on a one-layer prefix"
        self._cache: TreeKVCache | None = None
        self._last: torch.Tensor | None = None  # [H] the prefix layer's output at the last accepted position
        # prefix_token: the last accepted position's hidden state [H], waiting for its next token (the root), and
        # the root `draft` added it with (None: not added yet)
        self._pending: torch.Tensor | None = None
        self._pending_root: int | None = None
        # _packed_chain's arguments per chain depth, with the weights they were packed from (_chain_arguments)
        self._chain_args: dict[int, tuple] = {}

    def attach(self, backbone: nn.Module) -> "HydraHeads":
        """Give the heads the backbone's input embedding (and output rows for a shared LM head)."""
        self.embed_weight = backbone.get_input_embeddings().weight.detach()
        return super().attach(backbone)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0][0].linear.weight.dtype

    # ---------------------------------------------------------------- the math

    def head(self, k: int, hidden: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """Head k on hidden [n, H] and path tokens [n, k+1] (root first) -> logits [n, out_vocab]."""
        assert path.shape[-1] == k + 1 and path.shape[0] == hidden.shape[0], (path.shape, hidden.shape)
        assert self.embed_weight is not None, "call attach(backbone) first"
        emb = self.embed_weight[path].to(hidden.dtype).flatten(1)  # [n, (k+1) * H]
        x = self.blocks[k](self.dropout(torch.cat([hidden, emb], -1)))  # [n, H]
        return self.lm_logits(k, self.dropout(x))

    def forward(self, hidden: torch.Tensor, path: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced, for training. Either positions: hidden [N, H] (after the prefix layer, for
        Hydra++), path [N, K] the tokens x1..xK after each; or whole right-padded sequences: hidden
        [B, T, H] of the backbone, path [B, T, K], select [B, T] the positions to score (the prefix layer
        runs over the sequences first; causal, so padding at the end changes nothing before it).
        Returns logits [K, N, out_vocab]."""
        if hidden.dim() == 3:
            hidden, path = self.prefix_states(hidden, None, path[..., 0])[select], path[select]  # [N, H], [N, K]
        return torch.stack([self.head(k, hidden, path[:, :k + 1]) for k in range(self.cfg.num_heads)])

    def prefix_states(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The prefix layer over whole sequences: hidden [B, T, H] -> [B, T, H] (identity for plain Hydra).
        next_ids [B, T]: the token after each position (what `prefix_token` heads pair each state with)."""
        if self.prefix is None:
            return hidden
        return self.prefix(inputs_embeds=self.prefix_input(hidden, next_ids),
                           attention_mask=attention_mask).last_hidden_state

    def prefix_input(self, hidden: torch.Tensor, next_ids: torch.Tensor | None) -> torch.Tensor:
        """hidden [..., H], next_ids [...] -> the prefix layer's input [..., H]: fc([h, E(next)]) or h."""
        if self.fuse is None:
            return hidden
        assert next_ids is not None and next_ids.shape == hidden.shape[:-1], "prefix_token heads need the next ids"
        emb = self.embed_weight[next_ids].to(hidden.dtype)  # [..., H]
        return linear(torch.cat([hidden, emb], -1), self.fuse.weight, self.fuse.bias)

    # ---------------------------------------------------------------- the drafter contract

    def reset(self) -> None:
        """A new sequence: forget the prefix layer's cache."""
        self._cache, self._last, self._pending, self._pending_root = None, None, None, None

    def for_sequence(self) -> "HydraHeads":
        """Hydra++: these heads' weights with a prefix-layer cache of their own, for one of several
        sequences decoded together (a shallow copy: parameters and the lean forward are shared)."""
        if self.prefix is None:
            return self
        twin = copy.copy(self)
        twin.reset()  # its own sequence state; the original's stays as it is
        return twin

    @torch.no_grad()
    def observe(self, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """The backbone's hidden states [a, H] of newly accepted positions and their ids [a], in order (the
        prompt's after prefill, then each step's accepted path, the root first). Hydra++ runs its prefix layer
        over them; with `prefix_token` over all but the last, each with the next id (ids[0] follows the last
        position of the previous call, unless `draft` added that one with the root already)."""
        if self.prefix is None:
            return
        if self.fuse is None:
            self._last = self._extend(hidden.to(self.dtype))
            return
        assert ids is not None and ids.shape == hidden.shape[:1], "prefix_token heads observe ids too"
        rows, nxt = hidden.to(self.dtype)[:-1], ids[1:]
        if self._pending is not None and self._pending_root is None:  # no draft took it (a step without a tree)
            rows, nxt = torch.cat([self._pending[None], rows]), torch.cat([ids[:1], nxt])
        assert self._pending_root is None or self._pending_root == int(ids[0]), "observe after another root"
        if rows.shape[0]:
            self._extend(self.prefix_input(rows, nxt))
        self._pending, self._pending_root, self._last = hidden[-1].to(self.dtype), None, None

    def _extend(self, x: torch.Tensor) -> torch.Tensor:
        """The prefix layer over the next positions' inputs x [a, H], appended to its cache -> the output at
        the last of them [H]."""
        a, dev = x.shape[0], x.device
        if self._cache is None:
            self._cache = TreeKVCache(1, 0, self.dtype, dev)
        L = self._cache.length
        if L + a > self._cache.capacity:
            self._cache.reserve(max(2 * self._cache.capacity, L + a, 256))  # doubling: amortised copies
        # No causal mask for several positions: the layer's keys and values come from its inputs alone (one
        # layer), and only the last position's output is kept, which sees every position anyway.
        out = self._lean.from_embeddings(self._cache, x[None], torch.arange(L, L + a, device=dev)[None], None)  # [1, a, H]
        return out[0, -1]  # [H]

    @torch.no_grad()
    def draft(self, hidden: torch.Tensor, root: torch.Tensor, tree: Tree) -> torch.Tensor:
        """Candidate token per tree node, depth by depth. hidden [H] at the last verified position (Hydra++
        uses its prefix layer's output there instead), root 0-d token id. Returns ids [nodes]."""
        return self._draft(hidden, root, tree)[0]

    @torch.no_grad()
    def draft_confident(self, hidden: torch.Tensor, roots: torch.Tensor, tree: Tree, min_prob: float) -> list[tuple[Tree, torch.Tensor]]:
        """`draft` cut to the nodes whose path the heads give at least `min_prob` (MedusaHeads.draft_confident's
        rule; here each node's probability is its head's given the drafted path above it). Where a depth keeps no
        node, the deeper heads do not run. One sequence (Hydra++ keeps its state per sequence): hidden [1, H],
        roots [1] -> [(the cut of `tree`, ids [its nodes])]."""
        assert hidden.shape[0] == 1 and roots.shape == (1,) and 0 < min_prob < 1
        ids, path = self._draft(hidden[0], roots[0], tree, min_prob)
        keep = tuple((path >= min_prob).tolist())  # the root's path is 1
        cut = tree.cut(keep)
        return [(cut, ids if cut is tree else ids[torch.tensor(keep, device=ids.device)])]

    def _draft(self, hidden: torch.Tensor, root: torch.Tensor, tree: Tree, min_prob: float | None = None):
        """ids [nodes] and, with `min_prob`, each node's path probability [nodes] (float32; 0 below a depth that
        kept no node, whose ids are then not drafted), else None."""
        assert hidden.dim() == 1
        if self.fuse is not None and self._pending_root is None:  # the last position, with its next token now
            assert self._pending is not None, "Hydra++: observe() the prompt's hidden states before drafting"
            self._last = self._extend(self.prefix_input(self._pending[None], root.view(1)))
            self._pending_root = int(root)
        h = self._last if self.prefix is not None else hidden.to(self.dtype)
        assert h is not None, "Hydra++: observe() the prompt's hidden states before drafting"
        ids = torch.zeros(tree.size, dtype=torch.long, device=hidden.device)
        ids[0] = root
        path = None if min_prob is None else torch.zeros(tree.size, device=hidden.device)  # [nodes]
        if path is not None:
            path[0] = 1.0
        chain = self._packed_chain(h, int(root), tree) if tree.size == tree.depth + 1 and tree.topk == 1 else None
        if chain is not None:  # a top-1 chain (the CPU calibrations' trees): one C++ call, the same ids and floats
            ids[1:], probs = chain
            if path is not None:
                for d in range(1, tree.size):  # as the levels below: each node's parent times its own
                    path[d] = path[d - 1] * probs[d - 1]
            return ids, path
        for d, level in enumerate(tree.levels(hidden.device), start=1):
            paths = ids[level.parent_paths]  # [p, d] tokens from the root to each parent
            logits = self.head(d - 1, h.expand(paths.shape[0], -1), paths)  # [p, out_vocab]
            top = logits.topk(level.topk, dim=-1)  # [p, topk]
            ids[level.nodes] = self.to_full_ids(top.indices)[level.parent_pos, level.ranks]
            if path is not None:
                parents = level.parent_paths[level.parent_pos, -1]  # [n] each node's parent (its path's last node)
                path[level.nodes] = path[parents] * top_probs(top.values, logits)[level.parent_pos, level.ranks]
                if not bool((path[level.nodes] >= min_prob).any()):  # nothing deeper can be kept
                    break
        return ids, path

    def _packed_chain(self, h: torch.Tensor, root: int, tree: Tree) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chain's drafts after `root` from h [H]: full ids [depth] and each one's softmax probability [depth]
        (float32) in one C++ call (few_rows.hydra_chain: the products linear() would run, the same ids and floats),
        where every weight packs and h is what linear() sends to the packed kernel (CPU float32, no gradient, no
        dropout); else None. Depth by depth, a chain of 2's draft phase ran ~0.2 ms a step longer in the loop (stop 66)."""
        if not (h.is_cpu and h.dtype == torch.float32 and not torch.is_grad_enabled() and not self.training
                and packed_rows() >= 1 and self.embed_weight is not None and self.embed_weight.dtype == torch.float32
                and self.embed_weight.is_contiguous()):
            return None
        depth = tree.depth
        args = self._chain_args.get(depth)
        if args is None or args[0].state() is not args[1]:
            args = self._chain_args[depth] = self._chain_arguments(depth)
        _, _, module, blocks, lm, out = args
        if module is None:
            return None
        vocab = few_rows._EMPTY if self.vocab_map is None else self.vocab_map
        return module.hydra_chain(h.contiguous(), root, self.embed_weight, blocks, len(self.blocks[0]),
                                  self.blocks[0][0].res is not None, lm, out, depth, few_rows.activations() == "int8", vocab)

    def _chain_arguments(self, depth: int) -> tuple:
        """(weights, state, module, blocks, lm, out) for hydra_chain, module None where some weight does not pack as
        linear() routes it or the kernel is not built; the lists stay valid while the weights' WeightState (the first
        `depth` heads' linears and LM heads, or the shared LM-head rows) gives `state` again."""
        shared = self.lm_heads is None
        weights = WeightState([m for k in range(depth) for m in self.blocks[k].modules() if isinstance(m, nn.Linear)]
                              + ([] if shared else [self.lm_heads[k] for k in range(depth)]),
                              [(self, "shared_weight")] if shared else [])
        state, module, blocks, lm = weights.state(), few_rows.load(), [], []
        if module is None or not hasattr(module, "hydra_chain"):
            return weights, state, None, [], [], 0

        def add(owner, name: str, into: list, bias: bool) -> bool:
            w, b = getattr(owner, name), owner.bias if bias else None
            p = few_rows.packed(w) if w.is_contiguous() else None  # as linear() routes it
            if p is not None:
                into += [p.q, p.d, few_rows._EMPTY if p.m is None else p.m] + ([few_rows._EMPTY if b is None else b] if bias else [])
            return p is not None

        ok = True
        for k in range(depth):
            first, rest = self.blocks[k][0], list(self.blocks[k])[1:]
            ok &= add(first.linear, "weight", blocks, True)
            if first.res is not None:
                ok &= add(first.res, "weight", blocks, False)
            for block in rest:
                ok &= add(block.linear, "weight", blocks, True)
            ok &= add(self.lm_heads[k], "weight", lm, False) if self.lm_heads is not None else add(self, "shared_weight", lm, False)
        out = (self.lm_heads[0].weight if self.lm_heads is not None else self.shared_weight).shape[0]
        return weights, state, module if ok else None, blocks, lm, out

    @torch.no_grad()
    def teacher_topk(self, hidden: torch.Tensor, ids: torch.Tensor, n: int = MAX_RANK, chunk: int = 256) -> torch.Tensor:
        """hidden [T, H] of a whole sequence, ids [T] its tokens -> each head's top-n full ids [K, T, n]
        at each position t, given the true path ids[t+1..t+1+k] (past the end: token 0, whose targets
        the caller ignores anyway). What `calibrate` measures."""
        return self._teacher_top(hidden, ids, n, chunk, False)[0]

    def teacher_top_probs(self, hidden: torch.Tensor, ids: torch.Tensor, n: int = MAX_RANK,
                          chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """teacher_topk and the heads' softmax probabilities of those ids [K, T, n] (float32, as
        draft_confident computes them): what `calibrate` needs to predict a cut."""
        return self._teacher_top(hidden, ids, n, chunk, True)

    @torch.no_grad()
    def _teacher_top(self, hidden: torch.Tensor, ids: torch.Tensor, n: int, chunk: int, probs: bool):
        K, T = self.cfg.num_heads, ids.shape[0]
        padded = torch.cat([ids, ids.new_zeros(K + 1)])
        path = torch.stack([padded[1 + j:1 + j + T] for j in range(K)], -1)  # [T, K]: ids[t+1 .. t+K]
        h = self.prefix_states(hidden.to(self.dtype)[None], None, path[None, :, 0])[0]  # [T, H]
        out, ps = [], []
        for s in range(0, T, chunk):
            logits = self.forward(h[s:s + chunk], path[s:s + chunk])  # [K, c, out]
            top = logits.topk(n, dim=-1)
            out.append(self.to_full_ids(top.indices))
            if probs:
                ps.append(top_probs(top.values, logits))
        return torch.cat(out, 1), torch.cat(ps, 1) if probs else None
