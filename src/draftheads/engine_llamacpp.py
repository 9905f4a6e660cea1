"""llama.cpp as the verify engine: a GGUF backbone on llama.cpp's kernels, drafted for by PyTorch heads.

One llama_decode per step verifies the whole tree. llama.cpp masks attention by sequence: a batch token
at position p sees the cached cells that hold its first sequence id at positions <= p (llama-kv-cache.cpp,
set_input_kq_mask: `cells.seq_has(j, ubatch->seq_id[i][0])`, `p0 > p1` masked). So leaf j of the tree gets
sequence j, a copy of the accepted prefix (sequence 0 is the prefix and leaf 0's sequence at once), and
each node goes into the batch with the sequences of every leaf below it, at position L + depth. A node
then sees the prefix, its ancestors and itself: its first leaf's sequence holds one node per depth,
and the deeper ones are masked by position. That is tree attention, with llama.cpp's own mask.
Sequences that share cells need the unified KV buffer (`kv_unified`: without it, sequences coupled by a
shared token cannot be split into ubatches, llama-batch.cpp split_equal).

The cells must stay in position order. llama.cpp's CPU flash attention walks the cells in index order
and accumulates in the KV cache's f16, so the same visible tokens in another cell order give other
logits (measured: greedy output parted from llama.cpp's own on 9 of 13 prompts when accepted nodes kept
the cells they were verified in, since later tokens then filled the freed cells between them:
llama-kv-cache.cpp find_slot takes free cells from the lowest one freed). So the batch puts the chain of
first children (the rank-0 drafts, the likeliest path) right after the root, in cells just past the
accepted prefix; after acceptance the accepted nodes that are that chain's first rows stay, every other
cell of the tree is freed (llama_memory_seq_rm past them, llama_memory_seq_keep(0)), and the rest of the
accepted path is decoded again at the head of the next step's batch, before its tree.

Logits and hidden states come from the same decode: with embeddings on and pooling none llama.cpp
returns, per batch token, the logits and the output norm's result (`res->t_embd`, src/models/llama.cpp),
the hidden state the heads read. Embeddings on makes every token an output (llama-context.cpp:
`output_all = cparams.embeddings`), each with a vocabulary-wide logit row, so a prompt is prefilled with
them off and only its last token, which the heads draft from, is decoded with them on.

Flash attention is on: with it, a row of a many-token decode gets bit for bit the logits that a one-token
decode gives (measured on the default model, AMD EPYC with AVX-512), so a verified tree scores each node as
plain decoding would. Without it, llama.cpp's batched attention rows after the first differed by 0.4-0.9 in
logits (of ~30) from one-token decoding.

The V cache is q8_0 and the K cache f16. With equal K and V types llama.cpp's CPU flash attention takes
other kernels by shape: a split-KV path for one-token decodes once 512 cells are used, and a tiled path
for decodes of 64 rows or more, and each rounds differently from the one-row kernel that a verify
batch's rows get (greedy outputs parted from llama.cpp's own on 7 of 13 long prompts). Different K and
V types keep every shape on the one kernel (f32 V would not: llama.cpp stores it as f16). The baseline
`greedy` and the tests run the same configuration, so "equal to llama.cpp's greedy decoding" means
llama.cpp with `-fa on -ctv q8_0`, a setting its users run to halve the V cache.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .tree import Tree

INSTALL = "the llama.cpp engine needs llama-cpp-python: pip install draftheads[llamacpp]"
# Most rows one llama_decode scores as one-token decodes do: at 64 rows and more llama.cpp's CPU backend
# takes other kernels, whose logits differed from one-token decoding by up to 1.2 (measured, default model).
VERIFY_ROWS = 63
LOG_ERROR, LOG_CONT = 4, 5  # ggml_log_level (ggml.h): only errors, and their continuation lines, reach stderr


@dataclass(frozen=True)
class LlamaCppSettings:
    context: int = 0  # KV cells, i.e. tokens one sequence may hold; 0: the model's training context
    threads: int = 0  # llama.cpp threads; 0: as many as torch uses (--threads)
    batch: int = 512  # tokens per llama_decode (a longer prompt is prefilled in chunks)
    max_leaves: int = 64  # leaves one tree may have: one llama.cpp sequence each
    flash_attn: bool = True  # module docstring: why on

    def __post_init__(self):
        if self.context < 0 or self.threads < 0 or self.batch < 1 or not 1 <= self.max_leaves <= 255:
            raise UserError(f"llama.cpp settings need context >= 0, threads >= 0, batch >= 1 and 1 <= max_leaves "
                            f"<= 255 (llama.cpp's 256 sequences), not {asdict(self)}")
        if self.batch < self.max_leaves:  # llama.cpp reserves an output row per sequence in every decode; it
            # aborts the process (GGML_ASSERT n_outputs_max) on a smaller batch, so it is refused here
            raise UserError(f"llama.cpp settings need batch >= max_leaves (an output row per sequence), not "
                            f"batch {self.batch} and max_leaves {self.max_leaves}")


def bindings():
    """llama-cpp-python's ctypes module, or a one-line UserError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(INSTALL) from None
    return llama_cpp


@dataclass
class _Plan:
    """A tree's batch layout, built once per tree shape. Batch rows put the chain of first children (the
    rank-0 drafts) right after the root, then the other nodes in tree order (parents before children)."""

    rows: np.ndarray  # [N] node of each batch row
    row_of: np.ndarray  # [N] batch row of each node
    depths: np.ndarray  # [N] int32, per row
    n_seq: np.ndarray  # [N] int32 sequences per row (the leaves below its node)
    seqs: np.ndarray  # [N, leaves] int32, per row: its node's sequences, a leaf below it first
    chain: list[int]  # nodes of rows 0..: root, its first child, that one's first child, ...
    leaves: int


def plan(tree: Tree) -> _Plan:
    kids = tree.children
    chain = [0]
    while kids[chain[-1]]:
        chain.append(kids[chain[-1]][0])
    on_chain = set(chain)
    rows = chain + [i for i in range(tree.size) if i not in on_chain]
    # The chain's leaf is sequence 0, the accepted prefix: the chain's cells are sequence 0's already.
    leaves = [chain[-1]] + [i for i in range(tree.size) if not kids[i] and i != chain[-1]]
    leaf_seq = {leaf: j for j, leaf in enumerate(leaves)}
    below: list[list[int]] = [[] for _ in range(tree.size)]
    for i in reversed(range(tree.size)):  # children come after their parents
        below[i] = [leaf_seq[i]] if not kids[i] else sorted(s for k in kids[i] for s in below[k])
    seqs = np.zeros((tree.size, len(leaves)), dtype=np.int32)
    for r, i in enumerate(rows):
        seqs[r, :len(below[i])] = below[i]
    depths = np.array([0] + [len(p) for p in tree.paths], dtype=np.int32)
    return _Plan(np.array(rows), np.argsort(rows), depths[rows], np.array([len(below[i]) for i in rows], dtype=np.int32),
                 seqs, chain, len(leaves))


def batch_arrays(lib, n: int, seqs: int) -> tuple:
    """A llama_batch over arrays we own, for n tokens of up to `seqs` sequence ids each: one numpy write per
    field per step, no per-token ctypes calls. Returns (token, pos, n_seq_id, logits flags, seq ids [n, seqs],
    the llama_batch, the row pointers it holds, which must live as long as it)."""
    i32 = ctypes.POINTER(ctypes.c_int32)
    tok, pos, nseq = (np.zeros(n, dtype=np.int32) for _ in range(3))
    out = np.zeros(n, dtype=np.int8)
    seq = np.zeros((n, seqs), dtype=np.int32)  # row i: token i's sequence ids
    seq_rows = (i32 * n)(*[ctypes.cast(seq[i].ctypes.data, i32) for i in range(n)])
    batch = lib.llama_batch(
        n_tokens=0, token=tok.ctypes.data_as(i32), embd=None, pos=pos.ctypes.data_as(i32),
        n_seq_id=nseq.ctypes.data_as(i32), seq_id=ctypes.cast(seq_rows, ctypes.POINTER(i32)),
        logits=out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))
    return tok, pos, nseq, out, seq, batch, seq_rows


def decode(lib, ctx, batch, n: int) -> None:
    """llama_decode of the first n rows of `batch` (batch_arrays'), filled by the caller, in context ctx."""
    batch.n_tokens = n
    rc = lib.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode failed with {rc} on {n} tokens (1: no room in the KV cache)")


class LlamaCppCache:
    """One sequence's place in the engine's (single) llama.cpp KV cache. `length` tokens are accepted; the
    first `cells` of them are in llama.cpp's cells, in position order, and the rest (`redo`, ids) go into
    the next decode ahead of its tree (module docstring: why)."""

    def __init__(self, capacity: int):
        self.capacity, self.length, self.cells = capacity, 0, 0
        self.redo: list[int] = []
        self.pending: tuple[_Plan, list[int]] | None = None  # the tree verified last and its ids, until `keep`


class LlamaCppEngine:
    """A GGUF on llama.cpp (CPU): the Engine contract (engine.py) plus llama.cpp's own plain greedy
    decoding (`greedy`, the baseline of `bench --engine llama.cpp`). One sequence at a time."""

    device, dtype = torch.device("cpu"), torch.float32  # what the heads read: llama.cpp's float32 outputs

    def __init__(self, path: Path, settings: LlamaCppSettings | None = None):
        self.lib = lib = bindings()
        self.settings = s = settings or LlamaCppSettings()
        _quiet(lib)
        lib.llama_backend_init()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0  # the heads and the loop are on the CPU; so is this build of llama.cpp
        # ggml's AMX weight buffers (llama.cpp of llama-cpp-python 0.3.36) crash in ggml_backend_amx_mul_mat on an
        # AMX Xeon (Sapphire Rapids class, stop 48), the default model and tiny test models alike; setup.sh builds
        # without them, and a build that has them keeps the weights in plain CPU buffers (its AVX-512 kernels)
        mp.use_extra_bufts = b"AMX_INT8 = 1" not in lib.llama_print_system_info()
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise UserError(f"llama.cpp cannot load {path} (is it a GGUF of a model llama.cpp supports?)")
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.hidden_size = lib.llama_model_n_embd(self.model)
        train = lib.llama_model_n_ctx_train(self.model)
        self.threads = s.threads or torch.get_num_threads()
        # sequence 0 is also leaf 0's; sequences share cells: the tree's nodes belong to several (module docstring)
        self.ctx = self._new_context(min(s.context or train, train), s.max_leaves, unified=True)
        if not self.ctx:
            raise UserError(f"llama.cpp cannot make a context of {min(s.context or train, train)} tokens for {path}")
        self.context = lib.llama_n_ctx(self.ctx)
        self.memory = lib.llama_get_memory(self.ctx)
        buf = ctypes.create_string_buffer(128)
        lib.llama_model_desc(self.model, buf, 128)
        self.description = buf.value.decode(errors="replace")  # e.g. "llama ?B Q4_1 - Medium"
        self._embeddings: bool | None = None
        self._plans: dict[Tree, _Plan] = {}
        self._live: LlamaCppCache | None = None
        self._tok, self._pos, self._nseq, self._out, self._seq, self._batch, self._seq_ptrs = batch_arrays(
            lib, s.batch, s.max_leaves)

    def _new_context(self, cells: int, sequences: int, unified: bool):
        """A llama.cpp context on this model with the engine's settings (threads, batch, flash attention, the
        q8_0 V cache: what makes a batch's rows score as one-token decodes do), or NULL where llama.cpp refuses."""
        lib = self.lib
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = cells, sequences, unified
        cp.n_batch = cp.n_ubatch = self.settings.batch
        cp.pooling_type = lib.LLAMA_POOLING_TYPE_NONE  # a hidden state per token, not one per sequence
        cp.embeddings = False  # switched on per decode that needs hidden states
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.type_v = lib.GGML_TYPE_Q8_0  # module docstring: why not f16 like the keys
        flash = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.settings.flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.flash_attn_type = flash
        return lib.llama_init_from_model(self.model, cp)

    def batch_slots(self, slots: int, capacity: int) -> "LlamaCppSlots":
        """`slots` sequences of up to `capacity` tokens each, decoded together (LlamaCppSlots)."""
        return LlamaCppSlots(self, slots, capacity)

    # ---------------------------------------------------------------- llama.cpp calls

    def _set_embeddings(self, on: bool) -> None:
        if self._embeddings != on:
            self.lib.llama_set_embeddings(self.ctx, on)
            self._embeddings = on

    def _decode(self, n: int) -> None:
        """Decode the first n batch rows (filled by the caller)."""
        assert 0 < n <= len(self._tok)
        decode(self.lib, self.ctx, self._batch, n)

    def _logits(self, rows: int) -> np.ndarray:
        """[rows, vocab] view of llama.cpp's output buffer, valid until the next decode."""
        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(rows, self.vocab_size))

    def _hidden(self, rows: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.lib.llama_get_embeddings(self.ctx), shape=(rows, self.hidden_size))

    def _fill(self, ids, positions, out: int | np.ndarray, start: int = 0) -> int:
        """Put tokens of sequence 0 in the batch rows start..; returns the row after them."""
        end = start + len(ids)
        self._tok[start:end], self._pos[start:end], self._out[start:end] = ids, positions, out
        self._nseq[start:end], self._seq[start:end, 0] = 1, 0
        return end

    def _run(self, ids: np.ndarray, start: int, out: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Decode ids [n] of sequence 0 at positions start.., in chunks of `batch` tokens. out: "none" (no
        output), "last" (logits of the last token) or "all" (logits and hidden states of every token).
        Returns (hidden [n, H] for "all", logits of the last token [vocab])."""
        self._set_embeddings(out == "all")
        hidden, logits, step = [], None, len(self._tok)
        for a in range(0, len(ids), step):
            b = min(a + step, len(ids))
            flags = np.zeros(b - a, dtype=np.int8) if out != "all" else 1
            if out == "last" and b == len(ids):
                flags[-1] = 1
            self._decode(self._fill(ids[a:b], np.arange(start + a, start + b), flags))
            if out == "all":
                hidden.append(self._hidden(b - a).copy())
        if out != "none":
            logits = self._logits(b - a if out == "all" else 1)[-1]
        return (np.concatenate(hidden) if hidden else None), logits

    def _start(self, cache: LlamaCppCache | None) -> None:
        """A new sequence: the engine holds one, so the cache is emptied and earlier handles go stale."""
        self.lib.llama_memory_clear(self.memory, True)
        self._live = cache

    # ---------------------------------------------------------------- the Engine contract

    def new_cache(self, capacity: int) -> LlamaCppCache:
        assert capacity <= self.context, (capacity, self.context)
        return LlamaCppCache(capacity)

    def prefill(self, cache: LlamaCppCache, ids: torch.Tensor, hidden: str = "last"):
        assert ids.dim() == 1 and 0 < ids.numel() <= cache.capacity and hidden in ("none", "last", "all")
        self._start(cache)
        toks = ids.numpy().astype(np.int32)
        P = len(toks)
        if hidden == "all":  # Hydra++: every position's hidden state (and logits row) for its prefix layer
            h, logits = self._run(toks, 0, "all")
        elif hidden == "none":  # no heads: the next token's logits alone
            h, logits = self._run(toks, 0, "last")
        else:
            # The prompt in one batch, as llama.cpp's own decoding reads it: a batch of 64 rows or more runs
            # other kernels than a short one (VERIFY_ROWS), so reading it otherwise would change its cells.
            _, logits = self._run(toks, 0, "last")
            logits = logits.copy()
            # The heads draft from the last token's hidden state: decode that token once more, in a scratch
            # sequence over the same cells, then drop it. (A one-row decode: its hidden state may differ from
            # the batch's in the last digits; it is only drafted from, never verified against.)
            self.lib.llama_memory_seq_cp(self.memory, 0, 1, 0, P - 1)
            self._fill(toks[-1:], [P - 1], 1)
            self._seq[0, 0] = 1
            self._set_embeddings(True)
            self._decode(1)
            h = self._hidden(1).copy()
            self.lib.llama_memory_seq_rm(self.memory, 1, -1, -1)
        cache.length = cache.cells = P
        return (None if h is None else torch.from_numpy(h)), torch.from_numpy(logits)

    def verify(self, cache: LlamaCppCache, ids: torch.Tensor, tree: Tree):
        assert cache is self._live, "a stale cache: the engine has started another sequence since"
        assert ids.dim() == 1 and ids.numel() == tree.size
        L, N, R, p = cache.length, tree.size, len(cache.redo), self._plan(tree)
        assert L + N <= cache.capacity and R + N <= len(self._tok), "the loop keeps each step within capacity"
        for j in range(1, p.leaves):  # each leaf's sequence starts as a copy of the prefix (metadata only)
            self.lib.llama_memory_seq_cp(self.memory, 0, j, -1, -1)
        rows, k = R + N, p.leaves
        tok = np.concatenate([np.asarray(cache.redo, dtype=np.int32), ids.numpy().astype(np.int32)[p.rows]])
        pos = np.concatenate([np.arange(cache.cells, L, dtype=np.int32), p.depths + L])
        # accepted tokens not in the cells yet (keep) come first, as a chain that every node sees
        nseq = np.concatenate([np.full(R, k, dtype=np.int32), p.n_seq])
        seqs = np.concatenate([np.broadcast_to(np.arange(k, dtype=np.int32), (R, k)), p.seqs])
        self._set_embeddings(True)  # llama.cpp then outputs every row
        logits, hidden = [], []
        for a in range(0, rows, VERIFY_ROWS):  # one decode, unless the tree is too big to be scored exactly
            b = min(a + VERIFY_ROWS, rows)
            self._tok[:b - a], self._pos[:b - a], self._out[:b - a] = tok[a:b], pos[a:b], 1
            self._nseq[:b - a], self._seq[:b - a, :k] = nseq[a:b], seqs[a:b]
            self._decode(b - a)
            logits.append(self._logits(b - a))
            hidden.append(self._hidden(b - a))
            if b < rows:  # the next decode overwrites llama.cpp's output buffers
                logits[-1], hidden[-1] = logits[-1].copy(), hidden[-1].copy()
        cache.cells, cache.redo, cache.pending = L, [], (p, ids.tolist())
        at = R + p.row_of  # node order
        if len(logits) == 1:
            return torch.from_numpy(logits[0][at]), torch.from_numpy(hidden[0][at])
        return torch.from_numpy(np.concatenate(logits)[at]), torch.from_numpy(np.concatenate(hidden)[at])

    def keep(self, cache: LlamaCppCache, start: int, nodes: list[int]) -> None:
        """The accepted nodes that are the chain's first rows stay in their cells; the rest of the path is
        decoded again, ahead of the next tree, so that the cells stay in position order (module docstring)."""
        assert cache is self._live and cache.pending is not None, "keep() follows a verify()"
        assert start == cache.cells and nodes[0] == 0
        (p, ids), a = cache.pending, len(nodes)
        c = next((i for i, (n, m) in enumerate(zip(nodes, p.chain)) if n != m), min(a, len(p.chain)))
        self.lib.llama_memory_seq_rm(self.memory, 0, start + c, -1)
        if p.leaves > 1:
            self.lib.llama_memory_seq_keep(self.memory, 0)  # frees every cell that sequence 0 does not hold
        cache.length, cache.cells, cache.redo, cache.pending = start + a, start + c, [ids[n] for n in nodes[c:]], None

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        assert ids.dim() == 1 and 0 < ids.numel() <= self.context
        self._start(None)
        h, _ = self._run(ids.numpy().astype(np.int32), 0, "all")
        self._start(None)
        return torch.from_numpy(h)

    def _plan(self, tree: Tree) -> _Plan:
        p = self._plans.get(tree)
        if p is None:
            p = plan(tree)
            if p.leaves > self.settings.max_leaves:
                raise UserError(f"a tree of {p.leaves} leaves is more than the llama.cpp engine's "
                                f"{self.settings.max_leaves} sequences: choose a smaller tree")
            if tree.size + tree.depth > self.settings.batch:  # the tree and the path re-decoded ahead of it
                raise UserError(f"a tree of {tree.size} nodes and depth {tree.depth} needs a llama.cpp batch of "
                                f"{tree.size + tree.depth}, more than {self.settings.batch}: choose a smaller tree")
            if len(self._plans) >= 4096:  # prompt lookup makes a few hundred shapes; keep the memory bounded
                self._plans.clear()
            self._plans[tree] = p
        return p

    # ---------------------------------------------------------------- llama.cpp's own decoding

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
        """llama.cpp's plain greedy decoding: the prompt in one batch, then one token per llama_decode, the
        argmax of its logits each time (no hidden states). The new tokens, without the EOS."""
        assert prompt_ids and max_new_tokens >= 1 and len(prompt_ids) + max_new_tokens <= self.context
        self._start(None)
        _, logits = self._run(np.asarray(prompt_ids, dtype=np.int32), 0, "last")
        out, pos = [], len(prompt_ids)
        while True:
            token = int(np.argmax(logits))  # the first of equal maxima, as torch's argmax in the loop's acceptance
            if token in eos:
                break
            out.append(token)
            if len(out) == max_new_tokens:
                break
            _, logits = self._run(np.array([token], dtype=np.int32), pos, "last")
            pos += 1
        self._start(None)
        return out

    def __del__(self):
        lib = getattr(self, "lib", None)
        try:
            if getattr(self, "ctx", None):
                lib.llama_free(self.ctx)
            if getattr(self, "model", None):
                lib.llama_model_free(self.model)
        except Exception:  # noqa: BLE001 -- at interpreter exit the library may be gone already
            pass


class LlamaCppSlots:
    """Many sequences on llama.cpp at once, for the batched step (batch_llamacpp.py): slot s is llama.cpp
    sequence s in a context of its own on the engine's model, whose KV cache is split in one stream per
    sequence (kv_unified off). A stream's cells then follow its sequence's positions whatever the others do,
    so a step's row attends to the cells a lone decode would, in the same order (the module docstring: another
    order rounds differently), and it scores as llama.cpp's own one-token decoding does: tested, every reply of
    a batch equals llama.cpp's greedy decoding of its prompt alone. A token of several sequences cannot be
    split across streams, so trees are not verified here: each step decodes one token a sequence."""

    def __init__(self, engine: LlamaCppEngine, slots: int, capacity: int):
        assert slots >= 1 and 1 <= capacity <= engine.context, (slots, capacity, engine.context)
        if slots > engine.settings.batch:  # llama.cpp reserves an output row per sequence in every decode
            raise UserError(f"{slots} sequences at once need a llama.cpp batch of at least {slots} tokens, not "
                            f"{engine.settings.batch}")
        self.engine, self.lib, self.slots, self.capacity = engine, engine.lib, slots, capacity
        self.vocab_size = engine.vocab_size
        self.ctx = engine._new_context(slots * capacity, slots, unified=False)  # capacity cells a stream
        if not self.ctx:
            raise UserError(f"llama.cpp cannot make a context of {slots} sequences of {capacity} tokens")
        self.memory = self.lib.llama_get_memory(self.ctx)
        self.rows = engine.settings.batch  # a prompt's chunk, as the engine reads a lone prompt, or one token a slot
        self._tok, self._pos, self._nseq, self._out, self._seq, self._batch, self._seq_ptrs = batch_arrays(
            self.lib, self.rows, 1)

    def _decode(self, n: int) -> np.ndarray | None:
        """Decode the first n rows (filled by the caller) -> logits [flagged rows, vocab], a view of
        llama.cpp's buffer valid until the next decode (None: no row flagged)."""
        decode(self.lib, self.ctx, self._batch, n)
        flagged = int(self._out[:n].sum())
        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(flagged, self.vocab_size)) if flagged else None

    def prefill(self, slot: int, ids: list[int], start: int = 0) -> np.ndarray | None:
        """The chunk of the prompt ids at `start` into the slot, which holds the chunks before it: chunks of the
        engine's batch, as the engine reads a lone prompt (start: a multiple of `rows`) -> logits [vocab] after the
        prompt's last token (a copy) with the last chunk, else None."""
        assert 0 <= slot < self.slots and 0 < len(ids) <= self.capacity and 0 <= start < len(ids) and start % self.rows == 0
        end = min(start + self.rows, len(ids))
        n = end - start
        self._tok[:n], self._pos[:n], self._nseq[:n], self._seq[:n, 0] = ids[start:end], np.arange(start, end), 1, slot
        self._out[:n] = 0
        self._out[n - 1] = end == len(ids)
        logits = self._decode(n)
        return None if logits is None else logits[-1].copy()

    def step(self, slots: list[int], tokens: list[int], positions: list[int]) -> np.ndarray:
        """One token per slot, each at its position (its slot's length) -> logits [len(slots), vocab] after
        each, a view valid until the next call."""
        n = len(slots)
        assert 0 < n <= self.slots and len(tokens) == len(positions) == n
        self._tok[:n], self._pos[:n], self._nseq[:n], self._seq[:n, 0], self._out[:n] = tokens, positions, 1, slots, 1
        return self._decode(n)

    def release(self, slot: int) -> None:
        """Empty the slot's stream: its next sequence's cells start at the stream's first."""
        self.lib.llama_memory_seq_rm(self.memory, slot, -1, -1)

    def __del__(self):
        try:
            if getattr(self, "ctx", None):
                self.lib.llama_free(self.ctx)
        except Exception:  # noqa: BLE001 -- at interpreter exit the library may be gone already
            pass


_LOG_CALLBACK: list = []  # the ctypes callback must outlive every llama.cpp call that may log


def _quiet(lib) -> None:
    """Route llama.cpp's log to stderr for errors only (it prints hundreds of lines per load)."""
    if _LOG_CALLBACK:
        return
    last = [0]

    def log(level, text, user_data):
        if level == LOG_ERROR or (level == LOG_CONT and last[0] == LOG_ERROR):
            print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr)
        if level != LOG_CONT:
            last[0] = level

    _LOG_CALLBACK.append(lib.llama_log_callback(log))
    lib.llama_log_set(_LOG_CALLBACK[0], ctypes.c_void_p(0))
