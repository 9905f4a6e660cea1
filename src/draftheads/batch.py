"""Many sequences per verify pass: the batched decoding step behind the server's continuous batching.

Each sequence has its own cache slot and length (SlotKVCache), its own tree (or none), its own
sampling settings and its own drafter state (prompt lookup's n-grams). One step drafts every
sequence's tree, verifies all their nodes in ONE forward over [slots, nodes] on the lean forward
(each sequence attends only to its own cache and its own tree ancestors; shorter trees are padded
with nodes that see only themselves), then accepts and compacts the cache per sequence.

`steps()` has Decoder.steps' contract (a generator of the tokens each step emits), but it is driven
from outside: its first next() prefills the sequence into a free slot, and each later next() returns
what the last `step()` emitted for it. So DraftModel's text handling runs unchanged on top of it, and
one thread (the server's worker) interleaves many requests: step(), then next() on each of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .acceptance import SamplingConfig, accept, sample
from .defaults import BATCH_DRAFT_CONFIDENCE, BATCH_LOOKUP_ROWS, LOOKUP_MARGIN
from .errors import UserError
from .generate import ROOT_ONLY, Decoder, Stats
from .kvcache import SlotKVCache
from .lookup import Hybrid, PromptLookup
from .round_costs import RoundCosts
from .tree import Tree


def _heads(decoder: Decoder):
    return decoder.drafter.heads if decoder.drafter is not None else None


def _lookup_cfg(decoder: Decoder):
    return decoder.drafter.lookup.cfg if decoder.drafter is not None and decoder.drafter.lookup else None


def _on_llamacpp(decoder: Decoder) -> bool:
    """Whether decoder batches on llama.cpp (batch_llamacpp.py): its engine is engine_llamacpp.LlamaCppEngine."""
    return decoder.lean is None and hasattr(getattr(decoder, "engine", None), "batch_slots")


def refusal(decoder: Decoder) -> str | None:
    """Why `decoder`'s model cannot take the batched step (it then decodes one request at a time), or None."""
    if decoder.lean is None and not _on_llamacpp(decoder):
        return ("batched decoding runs on the lean forward (Llama, Mistral, Qwen2) or on llama.cpp; this model "
                "decodes one request at a time")
    return None


def batch_decoder(decoder: Decoder, slots: int, capacity: int, *args, **kwargs):
    """The batched step for decoder's engine: BatchDecoder (arguments as its) on the lean forward, or
    batch_llamacpp.LlamaCppBatch on llama.cpp, which verifies no trees (its docstring says why) and so takes
    none of the tree arguments."""
    if _on_llamacpp(decoder):
        from .batch_llamacpp import LlamaCppBatch

        return LlamaCppBatch(decoder, slots, capacity)
    return BatchDecoder(decoder, slots, capacity, *args, **kwargs)


def step_room(decoder: Decoder, tree: Tree, table: dict[int, Tree]) -> int:
    """Most positions one step of a sequence may write: its tree or a table entry, whichever is larger,
    plus prompt lookup's branches."""
    cfg = _lookup_cfg(decoder)
    return max(t.size for t in [tree, *table.values()]) + (PromptLookup(cfg).max_nodes if cfg else 0)


def slot_context(decoder: Decoder, capacity: int, batch_trees: dict[int, Tree] | None = None) -> int:
    """Tokens a sequence that follows the batch-size table may hold in a slot of `capacity`."""
    if _on_llamacpp(decoder):  # a step writes one token (batch_llamacpp.py)
        return min(capacity, decoder.engine.context) - 1
    table = (batch_trees or {}) if _heads(decoder) is not None else {}  # without heads no table applies
    return capacity - step_room(decoder, decoder.tree, table)


def _at(table: list[tuple[int, object]], batch: int):
    """The entry of the largest batch size <= `batch` in `table` ([(batch size, entry)], sorted), or None."""
    for b, entry in reversed(table):
        if b <= batch:
            return entry
    return None


@dataclass
class _Sequence:
    slot: int
    sp: SamplingConfig
    gen: torch.Generator | None
    tree: Tree
    drafter: Hybrid | None
    stats: Stats
    end: int  # the slot length this sequence may reach (prompt + its tokens + one tree)
    reserve: int  # most nodes of one of its steps
    by_batch: bool  # its tree follows the batch-size table (the request named none)
    hidden: torch.Tensor  # [H] at the last verified position
    root: int  # the backbone's next token, not yet verified
    emitted: list[int] | None = None  # what the last step() gave it, until its steps() hands it out
    done: bool = False  # no room left for another step


class BatchDecoder:
    """Decodes up to `slots` sequences together; `capacity` tokens per slot (prompt + reply + one tree)."""

    def __init__(self, decoder: Decoder, slots: int, capacity: int, max_rows: int | None = None,
                 batch_trees: dict[int, Tree] | None = None, prefill_chunk: int | None = None,
                 costs: RoundCosts | None = None, draft_confidence: float | dict[int, float] = BATCH_DRAFT_CONFIDENCE):
        reason = refusal(decoder)
        if reason:
            raise UserError(reason)
        self.dec, self.heads = decoder, _heads(decoder)
        self.lookup_cfg = _lookup_cfg(decoder)
        self.lookup_store = decoder.drafter.lookup.store if self.lookup_cfg else None  # shared, read only
        self.lookup_nodes = PromptLookup(self.lookup_cfg).max_nodes if self.lookup_cfg else 0
        self.cache = SlotKVCache.for_model(decoder.model, slots, capacity, decoder.lean.kv_dtype)
        self.capacity = capacity
        # Most tree nodes one pass verifies (None: no limit). Past it, every sequence decodes plainly in
        # that pass: on a CPU many sequences' trees cost more than they gain (docs/results.md, "batching").
        self.max_rows = max_rows
        # The tree for a pass of B sequences: the entry of the largest batch size <= B (`calibrate
        # --batch-sizes` measures whole rounds per batch size; a tree that pays alone may not in a batch).
        self.batch_trees = sorted((batch_trees or {}).items()) if self.heads is not None else []
        assert all(b >= 1 for b, _ in self.batch_trees), "batch sizes start at 1"
        # Row-exact verify (bf16 on a CPU): the nodes attend one by one, and a prompt is prefilled whole, as
        # Decoder.steps prefills it: a chunked prefill would round its keys differently.
        self.row_exact = decoder.engine.row_exact
        # prompt tokens per prefill forward (None: the whole prompt at once)
        self.prefill_chunk = None if self.row_exact else prefill_chunk
        # Served rounds' tokens/s, which decide whether the table's trees pay at each batch size (None: they
        # always do; calibrate times fixed trees).
        self.costs = costs
        # In a pass of two or more sequences, the table's followers verify only the nodes their heads give
        # at least this probability (MedusaHeads.draft_confident; 0: every node): one for every batch size,
        # or per batch size as calibrate chose it with the table (the entry of the largest size <= B; the
        # default below the smallest). Alone, a sequence keeps its whole tree unless calibrate chose a cut
        # for one sequence too (an entry for 1, which the decoding loop takes as well).
        cuts = draft_confidence if isinstance(draft_confidence, dict) else {2: draft_confidence}
        assert all(b >= 1 and 0.0 <= c < 1.0 for b, c in cuts.items())
        self.one_cut = cuts.get(1, 0.0)
        self.draft_confidence = sorted((b, c) for b, c in cuts.items() if b >= 2)
        self.free = list(range(slots))
        self.seqs: dict[int, _Sequence] = {}

    @property
    def context(self) -> int:
        """Tokens a sequence may hold (what DraftModel sizes replies by)."""
        return slot_context(self.dec, self.capacity, dict(self.batch_trees))

    def _reserve(self, tree: Tree, by_batch: bool) -> int:
        return step_room(self.dec, tree, dict(self.batch_trees) if by_batch else {})

    def tree_at(self, batch: int, tree: Tree) -> Tree:
        """The tree of a sequence that follows the table, in a pass of `batch` sequences (`tree` when the
        table is empty; the smallest batch size's entry below it)."""
        found = _at(self.batch_trees, batch)
        return found if found is not None else self.batch_trees[0][1] if self.batch_trees else tree

    def confidence_at(self, batch: int) -> float:
        """The path probability a table follower's node needs to be verified in a pass of `batch` sequences."""
        if batch < 2:  # one sequence: its own entry (the loop's cut), else its whole tree
            return self.one_cut
        found = _at(self.draft_confidence, batch)
        return BATCH_DRAFT_CONFIDENCE if found is None else found

    @torch.inference_mode()
    def steps(self, prompt_ids: list[int], max_new_tokens: int, sp: SamplingConfig, stats: Stats,
              tree: Tree | None = None) -> Iterator[list[int]]:
        """Decoder.steps' contract: yields the prefill's token, then per step() the tokens emitted. With
        `prefill_chunk`, a long prompt is prefilled a chunk per next(), each yielding [] (no token yet),
        so that the owner steps the other sequences in between."""
        assert self.free, "no free slot: the scheduler admits at most `slots` sequences"
        by_batch = tree is None
        tree = self.dec.tree if tree is None or self.heads is None else tree
        P, reserve = len(prompt_ids), self._reserve(tree, by_batch)
        if P == 0:
            raise UserError("the prompt is empty")
        if P + reserve >= self.capacity:
            raise UserError(f"the prompt has {P} tokens; a batch slot holds {self.capacity} (--max-seq-len)")
        slot = min(self.free)  # the lowest: a pass covers slots up to the highest running one
        self.free.remove(slot)
        try:
            stats.prompt_tokens, stats.tree_size = P, tree.size
            dev = self.dec.device
            ids = torch.tensor(prompt_ids, device=dev)
            prefill = self.dec.lean.prefill_slot_chunks(self.cache, slot, ids, self.prefill_chunk or P,
                                                        self.dec.engine.prompt_cache)
            t0 = self.dec._sync()
            for done in prefill:
                stats.prefill_s += self.dec._sync() - t0
                if done < P:
                    yield []
                t0 = self.dec._sync()
            seq = self._start(slot, ids, prefill.hidden, min(self.capacity, P + max_new_tokens + reserve), reserve,
                              by_batch, sp, stats, tree)
            yield [seq.root]
            yield from hand_out(seq)
        finally:
            self.seqs.pop(slot, None)
            self.cache.release(slot)
            self.free.append(slot)

    def _start(self, slot, ids, h, end, reserve, by_batch, sp, stats, tree) -> _Sequence:
        """The prompt ids [P] is in the slot, h [P, H] its hidden states: the drafter and the first token."""
        dec, dev = self.dec, self.dec.device
        t0 = dec._sync()
        drafter = None
        # The heads draft only where a tree it may take has nodes: with a plain table (calibrate's choice beside the
        # lookup) Hydra++'s prefix layer would follow every token for nothing
        table = [t for _, t in self.batch_trees] if by_batch and self.batch_trees else [tree]  # tree_at's choices
        drafts = any(t.size > 1 for t in table)
        if (self.heads is not None and drafts) or self.lookup_cfg is not None:
            heads = self.heads.for_sequence() if self.heads is not None and drafts else None  # Hydra++: its own prefix cache
            drafter = Hybrid(heads, PromptLookup(self.lookup_cfg, self.lookup_store) if self.lookup_cfg else None)
            drafter.reset()
            drafter.observe(h, ids)
        gen = torch.Generator(device=dev).manual_seed(sp.seed) if sp.seed is not None else None
        root = sample(dec.logits(h[-1]), sp, gen)
        stats.prefill_s += dec._sync() - t0
        seq = self.seqs[slot] = _Sequence(slot, sp, gen, tree, drafter, stats, end, reserve, by_batch, h[-1], root)
        return seq

    @torch.inference_mode()
    def step(self) -> int:
        """One verify pass over every admitted sequence's tree; each gets its emitted tokens. Returns the
        number of sequences the pass decoded (0: no pass)."""
        seqs = [s for s in self.seqs.values() if not s.done and s.emitted is None]
        if not seqs:
            return 0
        dec, dev = self.dec, self.dec.device
        S = 1 + max(self.seqs)  # the pass covers slots [0, S); idle ones below S are padding
        t0 = dec._sync()
        plans, B = {}, len(seqs)
        table = self.tree_at(B, self.dec.tree)  # what the sequences that follow the table take
        # Alone, a sequence takes its tree as the serial decoder does, unasked: a pass of 1-4 rows costs what
        # one row costs (docs/verify_profile.md), and exploring plain rounds there cost ~3% of the steps.
        # Prompt lookup's branches draft on a plain table's entry too, so the served rounds decide them as well:
        # every sequence's branches pad the pass to its longest tree (stop 56, 8 clients: 0.88x plain-batched).
        choice = (self.costs is not None and B > 1 and (table.size > 1 or self.lookup_cfg is not None)
                  and any(s.by_batch and s.drafter is not None for s in seqs))
        # Lookup alone on a plain entry must beat plain by LOOKUP_MARGIN: the table chose plain there, and the paired
        # rounds' ratio strays by a few % either way (defaults)
        with_table = self.costs.use_trees(B, 1.0 if table.size > 1 else LOOKUP_MARGIN) if choice else True
        tree = {s.slot: (table if with_table else ROOT_ONLY) if s.by_batch else s.tree for s in seqs}
        share = BATCH_LOOKUP_ROWS // B if B > 1 else None  # a sequence's most rows with lookup's branches
        lookup_rows = lambda t: self.lookup_nodes if share is None else min(self.lookup_nodes, max(share - t.size, 0))
        trees = self.max_rows is None or sum(t.size + lookup_rows(t) for t in tree.values()) <= self.max_rows
        drafting = []
        for s in seqs:
            L = int(self.cache.lengths[s.slot])
            plans[s.slot] = (L, ROOT_ONLY, torch.tensor([s.root], device=dev))
            # A one-node tree drafts nothing unless prompt lookup hangs branches on it (at 8 sequences the
            # table's entry is plain: the heads' server then runs the plain server's pass, nothing more)
            if (trees and s.drafter is not None and L + s.reserve <= s.end and (with_table or not s.by_batch)
                    and (tree[s.slot].size > 1 or (s.drafter.lookup is not None and lookup_rows(tree[s.slot]) > 0))):
                drafting.append(s)
        for slot, (step_tree, cands) in propose_all(drafting, tree, dev, self.confidence_at(B), share).items():
            plans[slot] = (plans[slot][0], step_tree, cands)
        # The pass writes q rows after every slot's length, its padding included: a tree that would push a
        # slot near its end past the capacity (another's, larger than that slot's own reserve) waits a pass.
        room = self.capacity - int(self.cache.lengths[:S].max())
        for slot, (L, t, cands) in plans.items():
            if t.size > room:
                plans[slot] = (L, ROOT_ONLY, cands[:1])
        q = max(t.size for _, t, _ in plans.values())
        if S == 1 and not self.row_exact:  # alone in the lowest slot (a server's lone client): nothing to pad
            h, logits, t1, t2 = self._verify_alone(*plans[0])
        else:
            h, logits, t1, t2 = self._verify_padded(plans, S, q)
        off, accepted = 0, {}
        for s in seqs:
            L, t, cands = plans[s.slot]
            nodes, s.root = accept(logits[off:off + t.size], cands, t, s.sp, s.gen)
            accepted[s.slot] = nodes
            off += t.size
            self.cache.keep(s.slot, nodes)
            hs = h[s.slot, nodes]  # [accepted, H]
            s.hidden = hs[-1]
            if s.drafter is not None:
                s.drafter.observe(hs, cands[nodes])
            s.emitted = cands[nodes[1:]].tolist() + [s.root]
            s.done = int(self.cache.lengths[s.slot]) + 1 > s.end
            if s.done:  # its keys are spent: the slot's padding rows go to column 0 until steps() frees it
                self.cache.release(s.slot)
        t3 = dec._sync()
        for s in seqs:  # the pass's time is every sequence's: each waited for all of it
            s.stats.record(plans[s.slot][1], accepted[s.slot], t1 - t0, t2 - t1, t3 - t2)
        if choice:  # what actually ran: a row budget may have sent the round plain
            self.costs.record(B, with_table and trees, sum(len(s.emitted) for s in seqs), t3 - t0)
        return B

    def _verify_alone(self, L: int, t: Tree, cands: torch.Tensor):
        """The pass of a lone sequence in slot 0, as the serial loop's engine.verify runs it: ids [1, q] with
        no padding rows to pack, and no mask for a plain step (it sees every cached entry and itself).
        Returns hidden [1, q, H], logits [q, vocab] and the times the pass began and ended."""
        dec = self.dec
        tt = t.tensors(dec.device, dec.dtype)  # built once per tree shape
        t1 = dec._sync()
        if t.size == 1:
            self.cache.begin_step(1, 1)
            mask = None
        else:
            mask = self.cache.tree_mask(tt.tree_bias[None])  # [1, 1, q, keys]
        h = dec.lean.hidden(self.cache, cands[None], (tt.depths + L)[None], mask)  # [1, q, H]
        logits = dec.logits(h[0])  # [q, vocab]
        return h, logits, t1, dec._sync()

    def _verify_padded(self, plans: dict, S: int, q: int):
        """One pass over slots [0, S), each slot's plan (L, tree, ids) padded to q nodes. Returns hidden
        [S, q, H], logits [real nodes, vocab] (slot by slot, each tree's nodes in order) and the times the
        pass began and ended."""
        dec, dev = self.dec, self.dec.device
        ids = torch.zeros(S, q, dtype=torch.long, device=dev)
        positions = torch.zeros(S, q, dtype=torch.long, device=dev)
        for slot, (L, t, cands) in plans.items():
            ids[slot, :t.size], positions[slot, :t.size] = cands, t.tensors(dev, dec.dtype).depths + L
            positions[slot, t.size:] = L
        rows = torch.cat([torch.arange(t.size, device=dev) + slot * q for slot, (_, t, _) in plans.items()])  # real rows
        t1 = dec._sync()
        if self.row_exact:  # each node's attention alone over its own slot's keys (engine.row_exact)
            self.cache.begin_step(S, q)
            h = dec.lean.hidden(self.cache, ids, positions, None, {slot: tuple(t.parent) for slot, (_, t, _) in plans.items()},
                                rows)
        else:
            # Padding nodes (and idle slots) see only themselves: no all -inf row, nothing real touched.
            bias = torch.full((S, q, q), torch.finfo(dec.dtype).min, dtype=dec.dtype, device=dev)
            bias.diagonal(dim1=1, dim2=2).zero_()
            for slot, (_, t, _) in plans.items():
                bias[slot, :t.size, :t.size] = t.tensors(dev, dec.dtype).tree_bias
            h = dec.lean.hidden(self.cache, ids, positions, self.cache.tree_mask(bias), None, rows)  # [S, q, H]
        logits = dec.logits(h.view(S * q, -1)[rows])  # [real nodes, vocab]
        return h, logits, t1, dec._sync()


def hand_out(seq) -> Iterator[list[int]]:
    """The tail of a batched steps(): yield what each step() emitted for `seq` (its `emitted`, then None), until
    the step that left it `done`, whose tokens are yielded too, as Decoder.steps' last step's are."""
    done = False
    while not done:
        assert seq.emitted is not None, "next() without a step() in between"
        out, seq.emitted, done = seq.emitted, None, seq.done
        yield out


def propose_all(seqs: list[_Sequence], tree: dict[int, Tree], dev, confidence: float = 0.0,
                max_nodes: int | None = None) -> dict[int, tuple[Tree, torch.Tensor]]:
    """{slot: its step tree and candidate ids [its size]} of each sequence, as Hybrid.propose gives them;
    tree: {slot: its ranked tree}. Sequences whose drafter is the same stateless heads (Medusa:
    `draft_many`) without prompt lookup, on the same tree, draft in one call: at 8 sequences one product
    per head instead of eight (~1.5 ms of a ~30 ms bf16 round). With `confidence` > 0 those of them that
    follow the batch table keep only the nodes their heads give at least that probability
    (MedusaHeads.draft_confident). max_nodes: each sequence's most nodes with lookup's branches (Hybrid.propose)."""
    out, groups = {}, {}
    for s in seqs:
        d, t = s.drafter, tree[s.slot]
        if d.lookup is None and t.size > 1 and hasattr(d.heads, "draft_many"):
            groups.setdefault((id(d.heads), id(t), s.by_batch), []).append(s)
        else:
            out[s.slot] = d.propose(s.hidden, torch.tensor(s.root, device=dev), t, max_nodes=max_nodes)
    for group in groups.values():
        t, heads = tree[group[0].slot], group[0].drafter.heads
        if len(group) == 1 and not (confidence > 0 and group[0].by_batch):  # alone: the serial loop's one call
            s = group[0]
            out[s.slot] = s.drafter.propose(s.hidden, torch.tensor(s.root, device=dev), t)
            continue
        hidden, roots = torch.stack([s.hidden for s in group]), torch.tensor([s.root for s in group], device=dev)
        if confidence > 0 and group[0].by_batch:  # a tree the request named is verified whole
            out.update((s.slot, plan) for s, plan in zip(group, heads.draft_confident(hidden, roots, t, confidence)))
        else:
            out.update((s.slot, (t, row)) for s, row in zip(group, heads.draft_many(hidden, roots, t)))  # ids [nodes]
    return out


def run_all(batch: BatchDecoder, replies: list) -> list:
    """Drive DraftModel.iter_generate generators (made with batch=`batch`) to their Results, admitting
    each as a slot frees: the scheduler of generate_many, in miniature the server's."""
    waiting, running, results = list(enumerate(replies)), {}, [None] * len(replies)

    def advance(i, chunks) -> bool:
        for chunk in chunks:  # one chunk per step; the last one carries the result
            if chunk.result is not None:
                results[i] = chunk.result
                return False
            return True
        return False

    while waiting or running:
        while waiting and batch.free:
            i, chunks = waiting.pop(0)
            if advance(i, chunks):
                running[i] = chunks
        batch.step()
        for i, chunks in list(running.items()):
            if not advance(i, chunks):
                del running[i]
    return results
