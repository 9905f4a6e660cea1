"""A lean forward for Llama-family backbones (Llama, Mistral and Qwen2 without sliding windows).

The loop's forwards are short (1-32 new tokens), so per-step costs matter: transformers' forward
builds masks and cache objects and dispatches attention every step, and its projections can reach
cpu_matmul's faster kernels only through a torch function mode, whose per-op Python dispatch costs
about what the one-row kernel saves. This forward runs the same math on the model's own weights and
modules (rotary embedding, activation, `apply_rotary_pos_emb`; RMSNorm as the fused `F.rms_norm`),
writes keys and values through TreeKVCache, and calls `cpu_matmul.linear` directly. Default model,
2 CPU cores, against transformers' forward on the same cache: 1 token 61.9 -> 52.2 ms, 16 nodes
118.5 -> 97.6 ms (docs/verify_profile.md). Results equal the generic path up to float rounding
order (tests/test_llama_forward.py); any other model runs the generic path.

On a CPU in float32, a pass of few rows runs the small ops between the products in C++ (layer_ops.py:
RMSNorm with the residual add, rotary, attention, SiLU(gate) * up), which computes each row alone: with
the row-independent few-row products, a tree node's hidden state is then bit for bit a plain step's.
Where every product's weight is GGUF blocks (the default model), the whole pass is one C++ call of those
same kernels and ops (decoder_stack.py): one row 12.8 -> 9.5 ms here, the same floats.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from . import decoder_stack, few_rows, layer_ops
from .cpu_matmul import MAX_ROWS, linear, packed_rows
from .kvcache import TreeKVCache, is_chain, kv_cache
from .row_attention import batched_rows_are_exact, chain_visibility, rows_attention
from .weight_state import WeightState

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
_NO_ROWS = torch.empty(0, dtype=torch.long)  # the decoder stack's "every row is real"


def unsupported_reason(model) -> str | None:
    """Why `model` cannot take the lean forward, or None if it can."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_TYPES:
        return f"model type {cfg.model_type!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    layer_types = getattr(cfg, "layer_types", None) or []
    if "sliding_attention" in layer_types or (cfg.model_type == "mistral" and cfg.sliding_window is not None):
        return "sliding-window attention"
    attn = model.base_model.layers[0].self_attn
    if any(getattr(attn, name, None) is not None for name in ("q_norm", "k_norm")):
        return "per-head query/key norms"
    for i, layer in enumerate(model.base_model.layers):
        for name in PROJECTIONS:
            if not _plain_linear(layer.get_submodule(name)):
                return f"layer {i} {name} is not a plain nn.Linear (adapter or quantised layer)"
    return None


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def cache_dtype(weight: torch.Tensor) -> torch.dtype:
    """What the lean forward's caches store keys and values in, for a model with this weight: float16 for float32
    weights on a CPU with the C++ attention, which reads halves as it goes (kvcache.kv_cache(), --kv-cache), else
    the weights' dtype."""
    if (weight.device.type == "cpu" and weight.dtype == torch.float32 and kv_cache() == "float16"
            and layer_ops.load() is not None):
        return torch.float16
    return weight.dtype


def rounds_cache(model) -> bool:
    """Whether our forward of `model` rounds its cached keys and values where transformers' own does not."""
    if not isinstance(model, torch.nn.Module) or unsupported_reason(model) is not None:
        return False
    w = model.get_input_embeddings().weight
    return cache_dtype(w) != w.dtype


def _plain_linear(module: torch.nn.Module) -> bool:
    """The lean forward multiplies by `weight` itself: right only for a plain Linear with a float weight.
    A peft adapter wraps the Linear and adds its own path; a quantised layer subclasses it or holds a
    packed weight (a Parameter subclass or a tensor subclass), so its weight is not the matrix."""
    w = getattr(module, "weight", None)
    return type(module) is torch.nn.Linear and type(w) is torch.nn.Parameter and w.dtype.is_floating_point


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """The model's RMSNorm module as one fused op (its Python forward is ~8 ops; 61 per step here)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def fuse_linears(modules: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight [sum of outs, in] (and bias) for Linears that read the same input, the modules' own
    parameters re-pointed to views of it, so that no memory is added and in-place updates (load_state_dict,
    an adapter merged in place) reach the fused product. Disjoint views save as separate tensors
    (transformers' save_pretrained clones them)."""
    w = torch.cat([m.weight.detach() for m in modules])
    b = torch.cat([m.bias.detach() for m in modules]) if modules[0].bias is not None else None
    at = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight.data = w[at:at + n]
        if b is not None:
            m.bias.data = b[at:at + n]
        at += n
    return w, b


def _fusable(modules: list[torch.nn.Linear]) -> bool:
    return len({m.weight.dtype for m in modules}) == 1 and len({m.bias is None for m in modules}) == 1


class LlamaForward:
    """The decoder stack of one supported backbone: ids -> final-norm hidden states."""

    @classmethod
    def shared(cls, model, fuse: bool | None = None) -> "LlamaForward":
        """The one LlamaForward of `model` (per `fuse`) that every engine on it uses. Fusing re-points the
        modules' weights to views of the instance's own fused tensors, so two instances that took turns (bench's
        loop and heads, two DraftModels on one backbone) re-fused and re-packed every weight at each turn:
        0.4-0.7 s added to the first pass after each switch. fuse None: the decoding loop's choice, fused on a CPU
        in float32 (q/k/v and gate/up as one product each)."""
        if fuse is None:
            p = next(model.parameters())
            fuse = p.device.type == "cpu" and p.dtype == torch.float32
        per_fuse = _SHARED.setdefault(model, {})
        if fuse not in per_fuse:
            per_fuse[fuse] = cls(model, fuse)
        return per_fuse[fuse]

    def __init__(self, model, fuse: bool = False):
        """fuse: run q/k/v and gate/up as one product each (their weights become views of one tensor:
        `fuse_linears`). On a CPU in fp32 one-row products stream the weights faster that way (AVX2 AMD
        EPYC, 30 layers of the default model's q/k/v/gate/up: 19.0 -> 14.3 ms at 1 row, 27.9 -> 24.6 at 8,
        but 69.1 -> 72.5 at 40 on MKL: more than cpu_matmul.MAX_ROWS rows take the products apart, unless
        the packed kernel takes them; scripts/compare_fused.py)."""
        reason = unsupported_reason(model)
        assert reason is None, reason
        body = model.base_model
        self.embed, self.rotary, self.norm, self.layers = body.embed_tokens, body.rotary_emb, body.norm, body.layers
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.fuse = fuse
        self.silu = cfg.hidden_act == "silu"  # what layer_ops.silu_mul computes
        self._fused: list | None = None  # per layer ((qkv weight, bias), (gate/up weight, bias)), or None: apart
        # The projections' parameters when fused: another state (re-pointed, written in place) means fuse again
        self._projections = WeightState([m for layer in self.layers for group in self._groups(layer) for m in group])
        self._fused_at: tuple | None = None
        # What the C++ decoder stack holds besides the fused products
        self._held = WeightState([m for layer in self.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj,
                                  layer.input_layernorm, layer.post_attention_layernorm)] + [self.norm])
        self._stack, self._stack_key = None, None

    def _groups(self, layer) -> tuple[list, list]:
        at, mlp = layer.self_attn, layer.mlp
        return [at.q_proj, at.k_proj, at.v_proj], [mlp.gate_proj, mlp.up_proj]

    def _fused_layers(self) -> list | None:
        """The fused products per layer, re-fused if the modules' weights were replaced (`model.to()` gives every
        parameter storage of its own) or written in place since (what was packed from them would be stale); None
        where fusing is off or does not apply."""
        if not self.fuse:
            return None
        if self._projections.state() is not self._fused_at:
            groups = [self._groups(layer) for layer in self.layers]
            if not all(_fusable(g) for pair in groups for g in pair):
                self.fuse = False
                return None
            # Out of inference mode: a parameter re-pointed to a view of a tensor made in it becomes an inference
            # tensor, which keeps no version counter, so an in-place write to it (load_state_dict, an adapter
            # merged) would go unseen, and the blocks packed from it and the C++ stack stay stale
            with torch.inference_mode(False):
                self._fused = [tuple(fuse_linears(g) for g in pair) for pair in groups]
            self._fused_at = self._projections.state()
        return self._fused

    @property
    def kv_dtype(self) -> torch.dtype:
        """What this forward's caches store keys and values in (cache_dtype)."""
        return cache_dtype(self.embed.weight)

    def _decoder_stack(self, rows: int, fused: list | None):
        """The C++ decoder stack for a pass of `rows` rows (decoder_stack.py), rebuilt where a weight it holds
        was replaced or written in place since; None where it does not apply."""
        if fused is None or not decoder_stack.applies(rows):
            return None
        key = (self._fused_at, self._held.state())
        if self._stack_key is None or any(a is not b for a, b in zip(key, self._stack_key)):
            self._stack, self._stack_key = decoder_stack.build(self, fused), key
        return self._stack

    def _packed_prefill(self, x: torch.Tensor) -> bool:
        """Whether a prefill's rows x [rows, hidden] take the packed kernel: its weights are GGUF blocks."""
        rows = self.prefill_rows()
        return rows is not None and x.is_cpu and x.dtype == torch.float32 and x.shape[0] <= rows

    def prefill_rows(self) -> int | None:
        """The most prompt rows one forward should take (None: any): where the packed kernel takes a prefill's
        products, the rows it takes (cpu_matmul.packed_rows). Past them the products go to torch's float32 GEMM,
        at twice the time a row on the Xeon of stop 53 (0.48 ms a row up to 128 rows, 1.0 at 129-200), so a
        longer prompt is prefilled in pieces of that many rows, each attending to the pieces before it. Each row
        then takes the same kernels whatever the prompt's length, and its attention the same sums (the masked
        keys add exact zeros), so a prompt prefilled in pieces of any size computes the same keys."""
        w = self.layers[0].mlp.down_proj.weight
        if not (w.is_cpu and w.dtype == torch.float32) or few_rows.packed(w) is None:  # never fused: packed as it is
            return None
        return packed_rows() or None

    def prefill_span(self, cache: TreeKVCache, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Prompt positions start..end of ids [P] into `cache` (holding the positions before start), in pieces of at
        most prefill_rows() rows, each causal and seeing the cache whole -> final-norm hidden states [end - start, H]."""
        w = self.embed.weight
        rows = min(end - start, self.prefill_rows() or end - start)
        causal = torch.full((rows, rows), torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device).triu(1)
        out = []
        for a in range(start, end, rows):
            b = min(a + rows, end)
            mask = cache.attention_mask(causal[:b - a, :b - a]) if b - a > 1 else None  # one token sees all the cache
            out.append(self.hidden(cache, ids[a:b], torch.arange(a, b, device=w.device), mask))  # [b - a, H]
        return torch.cat(out) if len(out) > 1 else out[0]

    def prefill_slot(self, cache, slot: int, ids: torch.Tensor) -> torch.Tensor:
        """Prefill one sequence, ids [P], into slot `slot` of a SlotKVCache while the other slots keep
        theirs. Returns its final-norm hidden states [P, hidden_size]."""
        chunks = self.prefill_slot_chunks(cache, slot, ids, ids.numel())
        for _ in chunks:
            pass
        return chunks.hidden

    def prefill_slot_chunks(self, cache, slot: int, ids: torch.Tensor, chunk: int, prompts=None) -> "PrefillChunks":
        """prefill_slot a chunk of at most `chunk` tokens per next(), so that a batch owner can run other
        sequences' steps in between (a long prompt does not freeze their streams). prompts: a
        kvcache.PromptCache that gives the prompt's cached start and keeps the prompt."""
        return PrefillChunks(self, cache, slot, ids, chunk, prompts)

    def hidden(self, cache, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
               trees: dict[int, tuple[int, ...]] | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions [q] (one sequence) or [batch, q] -> final-norm hidden states [q, hidden_size] or
        [batch, q, hidden_size]; the cache (TreeKVCache, or SlotKVCache for a batch) takes the new keys and
        values. mask: additive [batch or 1, 1, q, keys], or None when every cached entry is visible (q = 1).
        trees ({batch row: its tree's parents}) instead of a mask, for row-exact attention: each node's
        attention computes exactly what a plain step at its position computes, so its result does not
        depend on the other rows (needed in bf16; row_attention.py). Rows of other batch rows and past a
        tree's size are padding: their outputs are finite and meaningless. rows: the flat indices (into
        batch x q) of the real rows, when there is padding: the projections and the MLP then run on those
        alone, and the padding's outputs are zeros."""
        one = ids.dim() == 1
        if one:
            ids, positions = ids[None], positions[None]
        assert ids.dim() == 2 and positions.shape == ids.shape
        assert trees is None or (mask is None and all(len(t) <= ids.shape[1] for t in trees.values()))
        x = self.from_embeddings(cache, self.embed(ids), positions, mask, trees, rows)  # [b, q, hidden]
        return x[0] if one else x

    def from_embeddings(self, cache, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                        trees: dict[int, tuple[int, ...]] | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`hidden` from input embeddings x [b, q, hidden] (Hydra++'s prefix layer takes the backbone's
        hidden states as its inputs) -> final-norm hidden states [b, q, hidden]."""
        (b, q, width), d = x.shape, self.head_dim
        if rows is not None and rows.numel() == b * q:
            rows = None  # no padding: nothing to pack
        if rows is not None:
            # Batched trees of different sizes pad to the largest: the products, most of a pass's cost, run
            # on the real rows [R, hidden] only; attention, per slot, takes them scattered back.
            assert rows.dim() == 1 and 0 < rows.numel() < b * q
            x, (cos, sin) = x.reshape(b * q, width)[rows], self.rotary(x, positions.view(1, -1)[:, rows])  # [R, hidden], [1, R, head_dim]
            unpack = lambda t: t.new_zeros(b * q, t.shape[-1]).index_copy_(0, rows, t).view(b, q, -1)  # [R, n] -> [b, q, n]
        else:
            x = x.reshape(b * q, width)
            cos, sin = self.rotary(x, positions)  # [b, q, head_dim]
            unpack = lambda t: t.view(b, q, -1)
        # Fused products pay for few rows, which stream the weights; a prefill's many rows are compute-bound
        # and ran 5% slower fused on MKL (40 rows), so they take the modules' weights (views) apart, unless
        # the packed kernel takes them (cpu_matmul.packed_rows): then they are few rows here too.
        few = x.shape[0] <= MAX_ROWS or self._packed_prefill(x)
        fused = self._fused_layers() if few else None
        # The C++ layer ops (float32 CPU, few rows): one call each instead of torch's dispatch chains
        cpp = few and trees is None and self.silu and d % 8 == 0 and layer_ops.applies(x)
        if cpp:
            x = x.clone()  # updated in place below; a caller's tensor (Hydra++'s inputs) stays as it was
            cos, sin = cos.reshape(-1, d).contiguous(), sin.reshape(-1, d).contiguous()  # [rows, d]
            stack = self._decoder_stack(x.shape[0], fused)
            if stack is not None:  # the whole pass in one C++ call: the same ops, the same floats
                keys, values, starts, end = cache.write_views(b, q, self.kv_heads, d)  # per layer [b, kv_heads, capacity, d]
                return unpack(stack.forward(x, cos, sin, _NO_ROWS if rows is None else rows, b, q, keys, values, starts, end,
                                            layer_ops.EMPTY if mask is None else mask,
                                            few_rows.activations() == "int8"))  # [b, q, hidden]
        nq, nkv = self.heads * d, self.kv_heads * d
        visible, per_node = None, {}
        if trees is not None:
            # Chains (plain rows among them) attend in one call per layer where that is exact on this CPU;
            # a branching tree's nodes, whose paths are not their columns, attend one by one.
            g = self.heads // self.kv_heads
            batched = batched_rows_are_exact(x.dtype, torch.get_num_threads(), self.kv_heads, g, d)
            per_node = {r: p for r, p in trees.items() if not (batched and is_chain(p))}
            starts = cache.row_starts() if len(per_node) < b else None
        delta = None  # the last product, added to x by the next norm
        for i, layer in enumerate(self.layers):
            at, mlp = layer.self_attn, layer.mlp
            x, h = _add_norm(x, delta, layer.input_layernorm, cpp)  # [rows, hidden]
            if fused is not None:
                qkv = linear(h, *fused[i][0])  # [rows, (heads + 2 kv_heads) * d]
                qs, ks, vs = qkv.split([nq, nkv, nkv], -1)  # [rows, heads * d], [rows, kv_heads * d] x 2
            else:
                qkv = None
                qs = linear(h, at.q_proj.weight, at.q_proj.bias)  # [rows, heads * d]
                ks = linear(h, at.k_proj.weight, at.k_proj.bias)  # [rows, kv_heads * d]
                vs = linear(h, at.v_proj.weight, at.v_proj.bias)
            if cpp:  # rotate in place, attend with queries as [b, q, heads, d]
                for t, n in ((qkv, self.heads + self.kv_heads),) if qkv is not None else ((qs, self.heads), (ks, self.kv_heads)):
                    layer_ops.rope_(t, cos, sin, n)
                ks, vs = (unpack(t).view(b, q, -1, d).transpose(1, 2) for t in (ks, vs))  # [b, kv_heads, q, d]
                keys, values = cache.append(i, ks, vs)  # [b, kv_heads, keys, d]
                o = layer_ops.attention(unpack(qs).view(b, q, -1, d), keys, values, mask, self.scaling)  # [b, q, heads * d]
                o = o.view(b * q, -1)
            else:
                if rows is not None:  # rotate the packed rows, then give each slot its q places
                    qs, ks = apply_rotary_pos_emb(qs.view(1, -1, self.heads, d).transpose(1, 2),
                                                  ks.view(1, -1, self.kv_heads, d).transpose(1, 2), cos, sin)
                    qs, ks = (t.transpose(1, 2).reshape(rows.numel(), -1) for t in (qs, ks))
                qs, ks, vs = (unpack(t).view(b, q, -1, d).transpose(1, 2) for t in (qs, ks, vs))  # [b, heads or kv_heads, q, d]
                if rows is None:
                    qs, ks = apply_rotary_pos_emb(qs, ks, cos, sin)
                if trees is None:
                    keys, values = (t.to(qs.dtype) for t in cache.append(i, ks, vs))  # [b, kv_heads, keys, d]
                    o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=self.scaling,
                                                       enable_gqa=True)  # [b, heads, q, d]
                else:
                    keys, values, paths = cache.append_rows(i, ks, vs, per_node)  # [b, kv_heads, keys, d]
                    keys, values = keys.to(qs.dtype), values.to(qs.dtype)  # a 16-bit cache under float32: converted
                    if starts is not None and visible is None:  # every layer attends over the same columns
                        visible = chain_visibility(starts, q, keys.shape[2], g)  # [b, 1, q * g, keys]
                    o = rows_attention(qs, keys, values, visible, self.scaling) if visible is not None else qs.new_zeros(qs.shape)
                    for r, node, k1, v1 in paths:  # [1, kv_heads, its keys, d]: the path a branching tree's node sees
                        o[r, :, node] = rows_attention(qs[r:r + 1, :, node:node + 1], k1.to(qs.dtype), v1.to(qs.dtype), None,
                                                       self.scaling)[0, :, 0]
                o = o.transpose(1, 2).reshape(b * q, -1)  # [b * q, heads * d]
            x, h = _add_norm(x, linear(o[rows] if rows is not None else o, at.o_proj.weight, at.o_proj.bias),
                             layer.post_attention_layernorm, cpp)
            if fused is not None:
                gate, up = linear(h, *fused[i][1]).chunk(2, -1)  # [rows, intermediate] each
            else:
                gate, up = (linear(h, m.weight, m.bias) for m in (mlp.gate_proj, mlp.up_proj))
            delta = linear(layer_ops.silu_mul(gate, up) if cpp else mlp.act_fn(gate) * up, mlp.down_proj.weight,
                           mlp.down_proj.bias)
        return unpack(_add_norm(x, delta, self.norm, cpp)[1])  # [b, q, hidden]


_SHARED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[bool, LlamaForward]]" = weakref.WeakKeyDictionary()


def _add_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: torch.nn.Module, cpp: bool):
    """(x + delta, the RMSNorm module `norm` of it); delta None: nothing to add. cpp: the C++ op, which adds
    in place."""
    if cpp:
        return x, layer_ops.add_rms_norm(x, delta, norm)
    x = x if delta is None else x + delta
    return x, rms_norm(x, norm)


class PrefillChunks:
    """Iterating runs one chunk per item and yields the prompt tokens done so far. After the last chunk,
    `hidden` [P, hidden_size] holds the prompt's final-norm hidden states and the slot its keys and values
    (not before: until then the batch's passes may write the idle slot's column 0)."""

    def __init__(self, fwd: LlamaForward, cache, slot: int, ids: torch.Tensor, chunk: int, prompts=None):
        assert ids.dim() == 1 and ids.numel() > 0 and chunk > 0
        self.fwd, self.cache, self.slot, self.ids, self.chunk, self.prompts = fwd, cache, slot, ids, chunk, prompts
        self.hidden: torch.Tensor | None = None

    def __iter__(self):
        P, w = self.ids.numel(), self.fwd.embed.weight
        tmp = TreeKVCache(len(self.fwd.layers), P, w.dtype, w.device, kv_dtype=self.cache.kv.dtype)
        key = self.ids.tolist() if self.prompts is not None else None  # the prompt cache's key, made once
        done = self.prompts.restore(tmp, key) if self.prompts is not None else None  # [m, H]
        pieces = [] if done is None else [done]
        for a in range(tmp.length, P, self.chunk):
            b = min(a + self.chunk, P)
            pieces.append(self.fwd.prefill_span(tmp, self.ids, a, b))  # [b - a, H]: the cached chunks whole, this causal
            if b == P:
                self.cache.load(self.slot, tmp)
                self.hidden = torch.cat(pieces)
                if self.prompts is not None:
                    self.prompts.store(key, tmp, self.hidden)
            yield b  # tokens prefilled so far
