"""The backbone's KV cache for tree decoding: the ONE module that knows transformers' cache layout.

One preallocated tensor holds every layer's keys and values, sized to the request
(prompt + max_new_tokens + one tree), so a step never reallocates or concatenates. A verify pass
writes the N tree nodes at [L, L+N); `keep` then moves the accepted nodes to [L, L+a) for all layers
in one gather and forgets the rest by moving the length back.

Every layer keeps every entry, sliding-window layers included: the window is applied by the mask
(`attention_mask`), counted in positions as transformers counts it (a query at position p sees keys at
positions > p - window), so a tree node at depth d, which sits at position L + d, sees what plain
decoding would show it.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections import OrderedDict

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import defaults
from .errors import UserError, one_of

FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' names for the layer types we mask

# Row-exact steps (append_rows) attend over the keys up to a multiple of this many columns, the columns
# past each row's own masked (row_attention.chain_visibility): oneDNN builds a bf16 product for each new
# shape (its cache keeps 1,024), and a key count that grows by every step's tokens made every step's
# attention new. On this project's AMD EPYC a rows_attention call took 1,245 us over a new key count and
# 145 us over one seen before (scripts/bench_row_attention.py --new-shapes).
KEY_BLOCK = 64


_KV_CACHE = one_of(os.environ.get("DRAFTHEADS_KV_CACHE") or defaults.KV_CACHE, defaults.KV_CACHE_KINDS, "$DRAFTHEADS_KV_CACHE")


def set_kv_cache(kind: str | None) -> None:
    """What caches made from now on store keys and values in, process-wide, where the forward allows it
    (LlamaForward.kv_dtype: float32 weights on a CPU): "float16" or "float32"; None leaves it
    (defaults.KV_CACHE, or $DRAFTHEADS_KV_CACHE where set)."""
    global _KV_CACHE
    if kind is not None:
        _KV_CACHE = one_of(kind, defaults.KV_CACHE_KINDS, "kv-cache")


def kv_cache() -> str:
    """The current setting of set_kv_cache."""
    return _KV_CACHE


def attended(end: int, capacity: int) -> int:
    """The key columns a row-exact step over columns [0, end) attends: `end` up to a multiple of KEY_BLOCK."""
    return min(-(-end // KEY_BLOCK) * KEY_BLOCK, capacity)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword `model.forward` takes its cache by. transformers 5.2x renamed `past_key_values` to
    `cache` (the old name still works but warns on every call); remote-code models keep the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def attention_windows(config) -> dict[str, int | None]:
    """The model's layer types -> the sliding window each sees, in positions (None: the whole prefix).
    Layer types other than full and sliding-window attention (chunked, linear, recurrent) are refused."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:  # one kind for every layer: Mistral, Mixtral, Phi-3 use a window whenever one is set
        types = [SLIDING if window else FULL]
    windows = {}
    for kind in dict.fromkeys(types):
        if kind not in (FULL, SLIDING):
            raise UserError(f"{config.model_type} has {kind!r} layers; draftheads can mask full and sliding-window "
                            "attention only")
        if kind == SLIDING and not (isinstance(window, int) and window > 0):
            raise UserError(f"{config.model_type} has sliding-window layers but no window size (sliding_window={window!r})")
        windows[kind] = window if kind == SLIDING else None
    return windows


@functools.lru_cache(maxsize=256)
def path_plan(parent: tuple[int, ...]) -> tuple[tuple[tuple[int, int, bool], ...], bool]:
    """A tree's nodes (parent[i] < i, parent[0] = -1) written at slots [L, L+q) in their own order, visited
    depth first: per node (node, depth, copy), where copy says that slot L + depth holds another node at
    that point, so the node must be written there for slots [L, L + depth] to hold its path; and whether
    any copy happened (the nodes' order must then be restored). A chain needs no copy."""
    assert parent and parent[0] == -1 and all(0 <= parent[i] < i for i in range(1, len(parent))), parent
    children: list[list[int]] = [[] for _ in parent]
    for node in range(1, len(parent)):
        children[parent[node]].append(node)
    occupant, order, stack = list(range(len(parent))), [], [(0, 0)]
    while stack:
        node, depth = stack.pop()
        order.append((node, depth, occupant[depth] != node))
        occupant[depth] = node
        stack.extend((c, depth + 1) for c in reversed(children[node]))
    return tuple(order), any(copy for _, _, copy in order)


def is_chain(parent: tuple[int, ...]) -> bool:
    """Whether a tree (parents, parent[0] = -1) is a chain: each node at its own column sits on its path."""
    return all(p == i - 1 for i, p in enumerate(parent))


def _path_views(kv: torch.Tensor, row: int, L: int, keys: torch.Tensor, values: torch.Tensor, parent: tuple[int, ...]):
    """The views of append_rows for batch row `row` of one layer's kv [2, rows, kv_heads, capacity, head_dim],
    whose tree nodes keys/values [rows, kv_heads, q, head_dim] were written at [L, L + q)."""
    order, moved = path_plan(parent)
    for node, depth, copy in order:
        if copy:
            kv[0, row, :, L + depth] = keys[row, :, node]
            kv[1, row, :, L + depth] = values[row, :, node]
        yield row, node, kv[0, row:row + 1, :, :L + depth + 1], kv[1, row:row + 1, :, :L + depth + 1]
    if moved:
        n = len(parent)
        kv[0, row, :, L:L + n] = keys[row, :, :n]
        kv[1, row, :, L:L + n] = values[row, :, :n]


class _PreallocatedLayer(CacheLayerMixin):
    """A transformers cache layer backed by a slice of TreeKVCache.kv; returns views, never copies."""

    is_compileable = False

    def __init__(self, owner: "TreeKVCache", index: int):
        super().__init__()
        self.owner, self.index, self.length = owner, index, 0

    def lazy_initialization(self, key_states, value_states):
        self.owner._allocate(key_states)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' entry: the layer's entries in the forward's dtype (a 16-bit cache's, converted)."""
        keys, values = self.write(key_states, value_states)
        return keys.to(key_states.dtype), values.to(key_states.dtype)

    def write(self, key_states, value_states) -> tuple[torch.Tensor, torch.Tensor]:
        """Append q entries [batch, kv_heads, q, head_dim]; views of all of the layer's, in the cache's dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        end = self.length + q
        assert end <= self.owner.capacity, "KV cache overflow: the loop must keep within capacity"
        keys, values = self.owner.kv[self.index, :, :, :, :end].unbind()  # [batch, kv_heads, end, head_dim] each
        # Layers with fewer kv heads than the first would broadcast into the slice silently.
        assert key_states.shape == value_states.shape == (*keys.shape[:2], q, keys.shape[3]), \
            f"layer {self.index} keys {tuple(key_states.shape)} / values {tuple(value_states.shape)} do not fit the " \
            f"cache slots {(*keys.shape[:2], q, keys.shape[3])}"
        keys[:, :, self.length:].copy_(key_states)
        values[:, :, self.length:].copy_(value_states)
        self.length = end
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.owner.capacity


class _PrefixMask:
    """One sequence's additive mask for a step of q new tokens after L cached ones, [1, 1, q, L + q]: every cached
    entry visible, the new tokens as the step's tree says. A view of a buffer kept across steps, in which only the
    step's columns change: columns [0, zeroed) are 0 in every row, and a step writes its q x q block over whatever
    its columns held (a shorter sequence in the same buffer finds its prefix zeroed already, and what was zeroed
    past its block is zeroed again as it grows)."""

    def __init__(self, capacity: int, dtype: torch.dtype, device: torch.device | str):
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.buffer: torch.Tensor | None = None  # [1, 1, max_query, capacity]
        self.zeroed = 0

    def after(self, L: int, tree_bias: torch.Tensor) -> torch.Tensor:
        """tree_bias [q, q] -> [1, 1, q, L + q]."""
        q = tree_bias.shape[0]
        assert L + q <= self.capacity
        if self.buffer is None or self.buffer.shape[2] < q:
            self.buffer = torch.full((1, 1, q, self.capacity), torch.finfo(self.dtype).min, dtype=self.dtype,
                                     device=self.device)
            self.zeroed = 0
        if self.zeroed < L:
            self.buffer[..., self.zeroed:L] = 0
        self.zeroed = L  # the block below overwrites columns from L on (a new sequence may start below zeroed)
        self.buffer[0, 0, :q, L:L + q] = tree_bias
        return self.buffer[:, :, :q, :L + q]


class TreeKVCache:
    """KV cache for one sequence (batch 1) of at most `capacity` tokens. dtype: the forward's (its masks');
    kv_dtype: what the keys and values are stored in (default dtype; float16 under a float32 CPU forward
    that reads halves itself: LlamaForward.kv_dtype)."""

    def __init__(self, num_layers: int, capacity: int, dtype: torch.dtype, device: torch.device | str,
                 windows: dict[str, int | None] | None = None, kv_dtype: torch.dtype | None = None):
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.kv_dtype = kv_dtype or dtype
        self.windows = windows or {FULL: None}  # layer type -> sliding window (attention_windows)
        self.kv: torch.Tensor | None = None  # [layers, 2, batch, kv_heads, capacity, head_dim]
        self.layers = [_PreallocatedLayer(self, i) for i in range(num_layers)]
        self.hf = Cache(layers=self.layers)  # what the backbone's forward takes as its cache (cache_keyword)
        self._mask = _PrefixMask(capacity, dtype, device)
        self._views: tuple | None = None  # (kv, per-layer keys, per-layer values): write_views'

    @classmethod
    def for_model(cls, model, capacity: int, kv_dtype: torch.dtype | None = None) -> "TreeKVCache":
        p = next(model.parameters())
        return cls(model.config.num_hidden_layers, capacity, p.dtype, p.device, attention_windows(model.config), kv_dtype)

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` entries, keeping those cached (for a cache that grows with its sequence:
        Hydra++'s prefix layer); never shrinks."""
        if capacity <= self.capacity:
            return
        self.capacity, old = capacity, self.kv
        self._mask = _PrefixMask(capacity, self.dtype, self.device)
        if old is not None:
            self.kv = old.new_zeros(*old.shape[:4], capacity, old.shape[5])
            self.kv[..., :old.shape[4], :] = old

    def _allocate(self, key_states: torch.Tensor) -> None:
        if self.kv is None:
            b, h, _, d = key_states.shape
            self.kv = torch.zeros(len(self.layers), 2, b, h, self.capacity, d, dtype=self.kv_dtype,
                                  device=key_states.device)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write q new entries of one layer (keys, values [batch, kv_heads, q, head_dim]) after the cached
        ones; returns views of all of that layer's entries [batch, kv_heads, cached + q, head_dim], in the
        cache's dtype (kv_dtype)."""
        return self.layers[layer].write(keys, values)

    def write_views(self, b: int, q: int, kv_heads: int, head_dim: int) -> tuple[list, list, list[int], int]:
        """For a pass that writes its q new entries itself (decoder_stack.py, every layer in one call): each
        layer's keys and values [1, kv_heads, capacity, head_dim] (views of the cache), the column where the
        entries go ([one]) and the columns the pass attends. They count as appended on return, as after
        `append` on every layer."""
        assert b == 1, "one sequence"
        if self.kv is None:
            self._allocate(torch.empty(1, kv_heads, 0, head_dim, dtype=self.dtype, device=self.device))
        start = self.layers[0].length
        assert all(layer.length == start for layer in self.layers), "every layer holds the same entries"
        assert start + q <= self.capacity, "KV cache overflow: the loop must keep within capacity"
        if self._views is None or self._views[0] is not self.kv:  # made once per allocation (reserve replaces kv)
            self._views = self.kv, [self.kv[i, 0] for i in range(len(self.layers))], [self.kv[i, 1] for i in range(len(self.layers))]
        for layer in self.layers:
            layer.length, layer.is_initialized = start + q, True
        return self._views[1], self._views[2], [start], start + q

    def row_starts(self) -> torch.Tensor:
        """Before a row-exact step: the column where its nodes will be written, per batch row [1]."""
        return torch.tensor([self.length], device=self.device)

    def append_rows(self, layer: int, keys: torch.Tensor, values: torch.Tensor, branching: dict[int, tuple[int, ...]]):
        """`append` for the q nodes of a step (row-exact attention, for reduced precision: LlamaForward).
        Returns what `append` returns, with every node at its own column, which is its path's for a chain,
        and an iterator over the nodes of a branching tree, branching = {0: its parents} (parent[i] < i,
        parent[0] = -1) or {}: node by node in depth-first order, (0, node, keys, values) with keys/values
        [1, kv_heads, L + depth + 1, head_dim], views that hold exactly what that node sees, the prefix
        then its path from the root, contiguous and in order, as the plain step at its position sees
        them. A node whose slot holds another is copied in; the nodes' own order is restored after the
        last view. Use the returned entries before iterating, and consume the iterator to the end."""
        assert set(branching) <= {0}, "one sequence: its tree is row 0's"
        L = self.layers[layer].length
        self.append(layer, keys, values)
        end = attended(L + keys.shape[2], self.capacity)  # columns past L + q: masked (KEY_BLOCK)
        views = (v for row, parent in branching.items() for v in _path_views(self.kv[layer], row, L, keys, values, parent))
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end], views

    @property
    def length(self) -> int:
        return self.layers[0].length

    def attention_mask(self, tree_bias: torch.Tensor, positions: torch.Tensor | None = None):
        """Mask for a forward of q new tokens after the cached ones: the new tokens see each other as
        `tree_bias` [q, q] says, and the prefix (positions 0..L-1) as each layer type's window allows.
        positions [q]: the new tokens' positions, needed when a layer has a window. Returns an additive
        [1, 1, q, length + q] mask, or for a model with several layer types a dict of them keyed by type
        (the form transformers' forwards take for mixed full/sliding models)."""
        full = self._full_mask(tree_bias)
        masks = {kind: full if window is None else self._window(full, positions, window)
                 for kind, window in self.windows.items()}
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def _window(self, full: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
        """`full` [1, 1, q, L + q] with every key at position <= p - window hidden from a query at p."""
        assert positions is not None, "a sliding-window mask needs the new tokens' positions"
        L = self.length
        keys = torch.cat([torch.arange(L, device=positions.device), positions])  # [L + q] positions of all keys
        too_far = keys[None, :] <= positions[:, None] - window  # [q, L + q]
        return full.masked_fill(too_far, torch.finfo(self.dtype).min)

    def _full_mask(self, tree_bias: torch.Tensor) -> torch.Tensor:
        """The whole prefix visible, the new tokens as tree_bias says: [1, 1, q, L + q]."""
        return self._mask.after(self.length, tree_bias)

    def load_prefix(self, kv: torch.Tensor) -> None:
        """Make this empty cache hold m entries, kv [layers, 2, kv_heads, m, head_dim] (PromptCache)."""
        assert self.length == 0 and kv.shape[3] <= self.capacity, "a prefix loads into an empty cache with room"
        if self.kv is None:
            L, _, h, _, d = kv.shape
            self.kv = kv.new_zeros(L, 2, 1, h, self.capacity, d, dtype=self.kv_dtype)
        self.kv[:, :, 0, :, :kv.shape[3]] = kv
        for layer in self.layers:
            layer.length = kv.shape[3]

    def keep(self, nodes: list[int], start: int) -> None:
        """After a verify pass wrote N nodes at [start, start+N): keep `nodes` (indices into those N,
        root first, each a descendant of the previous) at [start, start+len(nodes)) and drop the rest."""
        a = len(nodes)
        # The accepted path is often nodes 0..a-1 already (a chain, or the top-1 path of a tree):
        # nothing to move then.
        if nodes != list(range(a)):
            index = self.kv.new_tensor(nodes, dtype=torch.long) + start  # on the cache's device
            src = self.kv.index_select(4, index)  # [layers, 2, batch, kv_heads, a, head_dim]
            self.kv[:, :, :, :, start:start + a] = src
        for layer in self.layers:
            layer.length = start + a


class SlotKVCache:
    """KV cache for `slots` independent sequences decoded together, one token each per step.

    Each slot has its own length: a step writes slot s's new entry at column lengths[s], and a slot that
    finished is refilled with the next sequence's prefill (`load`) while the others go on, so no row is
    ever padded. Used by batched distillation (train/batch_generate.py)."""

    def __init__(self, num_layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, kv_dtype: torch.dtype | None = None):
        self.capacity, self.dtype, self.device = capacity, dtype, device  # dtype: the masks' (TreeKVCache)
        self.kv = torch.zeros(num_layers, 2, slots, kv_heads, capacity, head_dim, dtype=kv_dtype or dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # [slots]
        # Slot and column indices on the cache's device, made once: steps slice them instead of allocating.
        self._rows = torch.arange(slots, device=device)
        self._cols = torch.arange(capacity, device=device)
        self._end = 1  # keys a step attends over: max(lengths) + q
        self._n = slots  # a step covers slots [0, _n): the batch keeps its running sequences in the low slots
        self._starts: list[int] = []  # lengths[:_n] at begin_step
        self._lone_mask = _PrefixMask(capacity, dtype, device)  # tree_mask's for slot 0 alone
        # Where this step's entries go and what it reads, for every layer at once (append, on its first layer):
        # per-layer indexing of the 6-d cache cost 16.2 -> 9.6 us a layer at one sequence (scripts/bench_slot_cache.py)
        self._rows_at: torch.Tensor | None = None  # flat rows of a layer's keys, or one slot's view [layers, 2, kv_heads, q, head_dim]
        self._read: tuple[int, torch.Tensor] | None = None  # (end, [layers, 2, n, kv_heads, end, head_dim])
        self._flat = self.kv.view(num_layers, 2, -1, head_dim)
        self._views: dict[int, tuple[list, list]] = {}  # write_views' per-layer keys and values, by batch size

    @classmethod
    def for_model(cls, model, slots: int, capacity: int, kv_dtype: torch.dtype | None = None) -> "SlotKVCache":
        cfg, p = model.config, next(model.parameters())
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, slots, capacity, kv_heads, head_dim, p.dtype, p.device, kv_dtype)

    def load(self, slot: int, prefill: TreeKVCache) -> None:
        """Make `slot` hold the sequence that `prefill` (a batch-1 cache) holds."""
        n = prefill.length
        assert n < self.capacity, "the prompt fills the slot: nothing could be generated"
        self.kv[:, :, slot, :, :n] = prefill.kv[:, :, 0, :, :n]
        self.lengths[slot] = n

    def release(self, slot: int) -> None:
        """Forget `slot`'s sequence. A free slot still computes a dummy row each step; it writes at column 0."""
        self.lengths[slot] = 0

    def step_mask(self) -> torch.Tensor:
        """Additive mask [slots, 1, 1, max(lengths) + 1] for a one-token step: slot s sees its own
        lengths[s] cached entries and the entry the step writes, nothing beyond."""
        assert int(self.lengths.max()) < self.capacity, "KV cache overflow: a slot outgrew its capacity"
        self._n, self._end, self._rows_at = self._rows.numel(), int(self.lengths.max()) + 1, None
        visible = self._cols[:self._end] <= self.lengths[:, None]  # [slots, end]
        mask = self.kv.new_zeros(visible.shape, dtype=self.dtype)
        return mask.masked_fill_(~visible, torch.finfo(self.dtype).min)[:, None, None]

    def write_views(self, b: int, q: int, kv_heads: int, head_dim: int) -> tuple[list, list, list[int], int]:
        """TreeKVCache.write_views for a step of the first b slots (after step_mask or tree_mask): each layer's
        keys and values [b, kv_heads, capacity, head_dim], where each slot's entries go (its length) and the
        columns the step attends. The entries join their sequences at `advance()` or `keep()`."""
        assert b == self._n and self.kv.shape[3:] == (kv_heads, self.capacity, head_dim), (b, self._n)
        starts = self.lengths[:b].tolist()
        assert max(starts) + q <= self._end <= self.capacity, "KV cache overflow"
        if b not in self._views:  # slicing 60 views costs ~0.1 ms: once per batch size
            layers = range(self.kv.shape[0])
            self._views[b] = [self.kv[i, 0, :b] for i in layers], [self.kv[i, 1, :b] for i in layers]
        return *self._views[b], starts, self._end

    def begin_step(self, n: int, q: int) -> None:
        """A step of q nodes in each of the first n slots (tree_mask's, or a row-exact one's: append_rows):
        check that every slot has room for them and fix the step's extent."""
        starts = self.lengths[:n].tolist()  # once per step, not per layer
        assert n <= self._rows.numel() and max(starts) + q <= self.capacity, "KV cache overflow"
        self._n, self._end, self._starts, self._rows_at = n, max(starts) + q, starts, None

    def row_starts(self) -> torch.Tensor:
        """After begin_step: the column where each slot's nodes will be written [n]."""
        return self.lengths[:self._n].clone()

    def append_rows(self, layer: int, keys: torch.Tensor, values: torch.Tensor, branching: dict[int, tuple[int, ...]]):
        """TreeKVCache.append_rows for a batch step (after begin_step): `append`'s entries of every slot,
        up to a multiple of KEY_BLOCK columns, and the views (slot, node, keys, values) [1, kv_heads,
        lengths[slot] + depth + 1, head_dim] of exactly what each node of the slots in `branching`
        ({slot: its tree's parents}) sees."""
        all_keys, all_values = self.append(layer, keys, values, attended(self._end, self.capacity))
        kv = self.kv[layer]  # [2, slots, kv_heads, capacity, head_dim]
        views = (v for slot, parent in branching.items() for v in _path_views(kv, slot, self._starts[slot], keys, values, parent))
        return all_keys, all_values, views

    def tree_mask(self, tree_bias: torch.Tensor) -> torch.Tensor:
        """Additive mask [n, 1, q, max(lengths) + q] for a step of q nodes in each of the first n slots
        (n = tree_bias.shape[0]; the step then covers those only): slot s's nodes see its lengths[s]
        cached entries and each other as tree_bias[s] [q, q] says (0 / -inf; a padding node should see
        itself, so that no row is all -inf)."""
        S, q, _ = tree_bias.shape
        self.begin_step(S, q)
        if S == 1:  # a lone sequence (a server's one client): the loop's kept buffer, not ~8 ops a step
            return self._lone_mask.after(self._starts[0], tree_bias[0])
        lengths = self.lengths[:S]
        prefix = self._cols[:self._end] < lengths[:, None]  # [n, end]
        mask = self.kv.new_full((S, q, self._end), torch.finfo(self.dtype).min, dtype=self.dtype)
        mask.masked_fill_(prefix[:, None, :], 0)
        cols = (lengths[:, None] + self._cols[:q])[:, None, :].expand(S, q, q)  # [n, q, q]
        return mask.scatter_(2, cols, tree_bias.to(self.dtype))[:, None]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, end: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write q entries per slot (keys, values [slots, kv_heads, q, head_dim]) after each slot's own
        length; returns every slot's entries [slots, kv_heads, end (default max(lengths) + q), head_dim].
        The entries join their sequences at `advance()` (q = 1) or `keep()` (a tree step), after the forward."""
        n, (_, heads, q, d) = self._n, keys.shape
        assert keys.shape[0] == n, (keys.shape, n)
        end = self._end if end is None else end
        if self._rows_at is None:  # once per step: every layer writes and reads the same places
            if n == 1:  # one sequence (a server's lone request): a view of its q columns
                L = int(self.lengths[0])
                self._rows_at = self.kv[:, :, 0, :, L:L + q]
            else:
                cols = self.lengths[:n, None] + self._cols[:q]  # [n, q]
                at = (self._rows[:n, None, None] * heads + torch.arange(heads, device=cols.device)[:, None]) * self.capacity + cols[:, None, :]
                self._rows_at = at.reshape(-1)  # [n * kv_heads * q] rows of a layer's keys viewed as [-1, head_dim]
            self._read = end, self.kv[:, :, :n, :, :end]
        if n == 1:
            self._rows_at[layer].copy_(torch.stack((keys[0], values[0])))
        else:
            # index_copy_ over flat rows: a third of the time of the equivalent indexed assignment; keys and
            # values in one call (this runs for every layer of every pass)
            self._flat[layer].index_copy_(1, self._rows_at, torch.stack((keys, values)).view(2, -1, d).to(self.kv.dtype))
        read_end, read = self._read
        assert read_end == end, "every layer of a step reads the same columns"
        all_keys, all_values = read[layer].unbind()  # [n, kv_heads, end, head_dim] each
        return all_keys, all_values  # in the cache's dtype: LlamaForward's attention reads halves itself

    def keep(self, slot: int, nodes: list[int]) -> None:
        """After a tree step wrote slot `slot`'s nodes after its length L: keep `nodes` (root first, each
        a descendant of the previous) at [L, L + len(nodes)) and drop the rest."""
        L, a = int(self.lengths[slot]), len(nodes)
        if nodes != list(range(a)):
            index = self._cols[nodes] + L
            self.kv[:, :, slot, :, L:L + a] = self.kv[:, :, slot, :, :].index_select(3, index)
        self.lengths[slot] = L + a

    def advance(self) -> None:
        self.lengths += 1


def _shared_start(a, b) -> int:
    """How many leading tokens the id sequences a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """Recent prompts' keys, values and final hidden states, so that a prompt that starts as one of them did
    (every chat request starts with its template's system prompt: 24 of the default model's ~50 tokens on
    vicuna questions) prefills only the rest: what serving engines call prefix caching. Keyed by token ids;
    the least recently used prompt goes first once more than `max_tokens` tokens are held.

    The restored entries came from a forward over another prompt, whose row count may round some of them
    differently from this prompt's own prefill (fp32 on a CPU: 9 of 80 vicuna prompts had a bit of their
    hidden states differ, 0 of 80 greedy replies: scripts/compare_prompt_cache.py). Row-exact engines (bf16 on a CPU) take none (TorchEngine.prompt_cache)."""

    def __init__(self, max_tokens: int, min_tokens: int = 8):
        assert max_tokens > 0 and min_tokens > 0
        self.max_tokens, self.min_tokens = max_tokens, min_tokens  # reuse at least min_tokens, or prefill it all
        self.entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.held = 0  # tokens held, summed over entries
        self.counts = {"prompts": 0, "hits": 0, "tokens": 0, "tokens_reused": 0}  # /health

    def restore(self, cache: TreeKVCache, ids: list[int]) -> torch.Tensor | None:
        """Load into the empty `cache` the longest cached prefix of `ids` (its last token is always computed:
        its logits are the prompt's); returns that prefix's hidden states [m, hidden_size], or None when
        fewer than min_tokens match."""
        best, m = None, 0
        for key in self.entries:
            n = _shared_start(key, ids)
            if n > m:
                best, m = key, n
        m = min(m, len(ids) - 1)
        self.counts["prompts"] += 1
        self.counts["tokens"] += len(ids)
        if m < self.min_tokens:
            return None
        self.entries.move_to_end(best)
        kv, hidden = self.entries[best]  # [layers, 2, kv_heads, n, head_dim], [n, hidden_size]
        cache.load_prefix(kv[:, :, :, :m])
        self.counts["hits"] += 1
        self.counts["tokens_reused"] += m
        return hidden[:m]

    def store(self, ids: list[int], cache: TreeKVCache, hidden: torch.Tensor) -> None:
        """Keep the prompt `ids` that `cache` holds (its first len(ids) entries) and its hidden states [P, H]."""
        key, P = tuple(ids), len(ids)
        assert hidden.shape[0] == P and cache.length >= P
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        if P > self.max_tokens:
            return
        self.entries[key] = (cache.kv[:, :, 0, :, :P].clone(), hidden.clone())
        self.held += P
        while self.held > self.max_tokens:
            old, _ = self.entries.popitem(last=False)
            self.held -= len(old)
