"""The batched step on the llama.cpp engine: batch.BatchDecoder's contract for a GGUF on llama.cpp.

Each sequence is a llama.cpp sequence with a KV stream of its own (engine_llamacpp.LlamaCppSlots), and one
llama_decode a step takes the next token of every running sequence. Trees are not verified in a batch: a
tree's node belongs to the sequence of every leaf below it, and one token cannot live in several streams.
Nor would they pay: on llama.cpp a second verified row costs 40-80% of a one-token step (stop 48's Xeon: 17.9
against 12.5 ms; the AVX2 EPYC of stop 66: 16.2 against 9.2), so the shipped heads' calibration for llama.cpp
decodes plainly even alone. So a request decodes here as llama.cpp's own decoding does, whatever tree it
names; `--max-batch 1` keeps one request at a time on the engine's tree-verifying context. Sampling goes
through the loop's `accept`, so each sequence draws what the loop would from the same logits and seed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .acceptance import SamplingConfig, accept
from .batch import hand_out
from .errors import UserError
from .generate import ROOT_ONLY, Decoder, Stats


@dataclass
class _Sequence:
    slot: int
    sp: SamplingConfig
    gen: torch.Generator | None
    stats: Stats
    end: int  # the slot length this sequence may reach (prompt + its tokens + the last root)
    length: int  # tokens in its slot
    root: int  # the backbone's next token, emitted, not yet in the slot
    emitted: list[int] | None = None  # what the last step() gave it, until its steps() hands it out
    done: bool = False  # no room left for another step


class LlamaCppBatch:
    """Decodes up to `slots` sequences together on decoder's llama.cpp engine; `capacity` tokens a slot
    (prompt + reply). The surface the server and generate_many drive: `free`, `context`, `steps`, `step`."""

    def __init__(self, decoder: Decoder, slots: int, capacity: int):
        engine = decoder.engine
        self.capacity = min(capacity, engine.context)
        self.slots = engine.batch_slots(slots, self.capacity)
        self.free = list(range(slots))
        self.seqs: dict[int, _Sequence] = {}

    @property
    def context(self) -> int:
        """Tokens a sequence may hold (what DraftModel sizes replies by): a step writes one."""
        return self.capacity - 1

    def steps(self, prompt_ids: list[int], max_new_tokens: int, sp: SamplingConfig, stats: Stats,
              tree=None) -> Iterator[list[int]]:
        """Decoder.steps' contract, driven from outside as BatchDecoder.steps is: the first next() prefills
        the prompt into a free slot and yields its token, each later next() what the last step() emitted. A
        prompt longer than a llama.cpp batch is read a batch per next(), each yielding [] (no token yet), so that
        the owner steps the others in between (in the engine's own chunks: others would round its cells
        differently). `tree` is not verified here (module docstring)."""
        assert self.free, "no free slot: the scheduler admits at most `slots` sequences"
        P = len(prompt_ids)
        if P == 0:
            raise UserError("the prompt is empty")
        if P + 1 >= self.capacity:
            raise UserError(f"the prompt has {P} tokens; a batch slot holds {self.capacity} (--max-seq-len)")
        slot = min(self.free)
        self.free.remove(slot)
        try:
            stats.prompt_tokens, stats.tree_size = P, 1
            for start in range(0, P, self.slots.rows):  # a chunk a next(): the others step in between
                t0 = time.perf_counter()
                last = self.slots.prefill(slot, prompt_ids, start)  # [vocab] after the last chunk
                stats.prefill_s += time.perf_counter() - t0
                if last is None:
                    yield []
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
            _, root = accept(torch.from_numpy(last)[None], torch.tensor([0]), ROOT_ONLY, sp, gen)
            stats.prefill_s += time.perf_counter() - t0
            seq = self.seqs[slot] = _Sequence(slot, sp, gen, stats, min(self.capacity, P + max_new_tokens + 1), P, root)
            yield [root]
            yield from hand_out(seq)
        finally:
            self.seqs.pop(slot, None)
            self.slots.release(slot)
            self.free.append(slot)

    def step(self) -> int:
        """One llama_decode over the next token of every running sequence that has handed out its last
        tokens; each gets its emitted token. Returns the number of sequences decoded (0: no decode)."""
        seqs = [s for s in self.seqs.values() if not s.done and s.emitted is None]
        if not seqs:
            return 0
        t0 = time.perf_counter()
        logits = torch.from_numpy(self.slots.step([s.slot for s in seqs], [s.root for s in seqs],
                                                  [s.length for s in seqs]))  # [B, vocab], llama.cpp's buffer
        t1 = time.perf_counter()
        for j, s in enumerate(seqs):
            _, s.root = accept(logits[j:j + 1], torch.tensor([s.root]), ROOT_ONLY, s.sp, s.gen)
            s.length += 1
            s.emitted = [s.root]
            s.done = s.length + 1 > s.end
        t2 = time.perf_counter()
        for s in seqs:  # the decode's time is every sequence's: each waited for all of it
            s.stats.record(ROOT_ONLY, [0], 0.0, t1 - t0, t2 - t1)
        return len(seqs)
