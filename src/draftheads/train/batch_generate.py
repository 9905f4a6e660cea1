"""Batched generation on the lean Llama-family forward: the engine behind `draftheads distill`.

Every slot decodes one token per step. When a sequence ends, its slot is refilled at once with the
next request's prefill while the others go on (continuous refill), so no step is spent on finished
sequences and no row is padded: transformers' `generate` on a left-padded batch runs every row until
the longest answer ends. A request can keep the backbone's final hidden states at every position
(prompt and answer), which are exactly the features heads train on, so the separate feature pass
over the distilled data is not needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..acceptance import SamplingConfig, greedy_tokens, sampling_probs
from ..cpu_matmul import linear
from ..kvcache import SlotKVCache
from ..llama_forward import LlamaForward


@dataclass
class Request:
    ids: list[int]  # the prompt's token ids
    max_new_tokens: int
    sampling: SamplingConfig
    keep_hidden: bool = False
    tag: object = None  # the caller's


@dataclass
class Finished:
    request: Request
    new_ids: list[int]  # generated ids, the end token included when `ended`
    ended: bool  # an end token was generated (else max_new_tokens was reached)
    hidden: torch.Tensor | None  # [len(ids) + len(new_ids), hidden_size] fp16 on CPU, if kept


@dataclass
class _Slot:
    req: Request
    new_ids: list[int]
    hidden: list[torch.Tensor] = field(default_factory=list)  # [n, hidden_size] pieces
    done: bool = False  # the last id in new_ids is the final one


class BatchGenerator:
    """Decodes many requests on `slots` slots of one SlotKVCache. `capacity` bounds prompt + answer."""

    def __init__(self, model, slots: int, capacity: int, eos_ids: list[int], seed: int = 0):
        # The forward the decoding loop runs on this model (fused products and the one-call C++ pass on a CPU in
        # float32), so the data is what decoding computes, at its speed.
        self.fwd = LlamaForward.shared(model)  # asserts the model is supported
        self.lm_head = model.get_output_embeddings()
        self.cache = SlotKVCache.for_model(model, slots, capacity, self.fwd.kv_dtype)
        self.eos = set(eos_ids)
        p = next(model.parameters())
        self.device = p.device
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.slots: list[_Slot | None] = [None] * slots

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] -> [n, vocab]"""
        return linear(hidden, self.lm_head.weight, self.lm_head.bias)

    def _pick(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """logits [n, vocab] of the slots `rows` -> one token each, by each request's own sampling."""
        out = greedy_tokens(logits)  # [n] ids
        for sp in {id(self.slots[r].req.sampling): self.slots[r].req.sampling for r in rows}.values():
            if sp.temperature == 0:
                continue
            idx = [i for i, r in enumerate(rows) if self.slots[r].req.sampling is sp]
            probs = sampling_probs(logits[idx], sp)  # [m, vocab]
            for i, token in zip(idx, torch.multinomial(probs, 1, generator=self.gen).squeeze(-1).tolist()):
                out[i] = token
        return out

    def _take(self, slot: _Slot, token: int) -> None:
        slot.new_ids.append(token)
        slot.done = token in self.eos or len(slot.new_ids) >= slot.req.max_new_tokens

    def _prefill(self, s: int, req: Request) -> None:
        P = len(req.ids)
        assert 0 < P and P + req.max_new_tokens <= self.cache.capacity, "request longer than the slot capacity"
        h = self.fwd.prefill_slot(self.cache, s, torch.tensor(req.ids, device=self.device))  # [P, H]
        slot = self.slots[s] = _Slot(req, [])
        if req.keep_hidden:
            slot.hidden.append(h.to("cpu", torch.float16))
        self._take(slot, self._pick(self._logits(h[-1:]), [s])[0])

    def _finish(self, s: int) -> Finished:
        slot, self.slots[s] = self.slots[s], None
        self.cache.release(s)
        ended = slot.new_ids[-1] in self.eos
        hidden = torch.cat(slot.hidden) if slot.req.keep_hidden else None
        return Finished(slot.req, slot.new_ids, ended, hidden)

    @torch.inference_mode()
    def run(self, next_request: Callable[[], Request | None]) -> Iterator[Finished]:
        """Decode until every slot has finished and `next_request()` returns None. It is called whenever
        a slot is free, also after it returned None, so the caller may queue new requests (e.g. from a
        finished one) between yields."""
        while True:
            for s in range(len(self.slots)):
                while self.slots[s] is None:
                    req = next_request()
                    if req is None:
                        break
                    self._prefill(s, req)
                    if self.slots[s].done and not self.slots[s].req.keep_hidden:
                        yield self._finish(s)  # ended on its first token: nothing more to compute
            rows = [s for s, slot in enumerate(self.slots) if slot is not None]
            if not rows:
                return
            # The last id of each slot goes in; a slot whose last id was final gets that id's hidden
            # state (the features need every position) and leaves.
            last = torch.tensor([slot.new_ids[-1] if slot else 0 for slot in self.slots], device=self.device)
            mask = self.cache.step_mask()  # [slots, 1, 1, keys]
            h = self.fwd.hidden(self.cache, last[:, None], self.cache.lengths[:, None], mask)[:, 0]  # [slots, H]
            self.cache.advance()
            live = [s for s in rows if not self.slots[s].done]
            picks = dict(zip(live, self._pick(self._logits(h[live]), live))) if live else {}
            h_cpu = h.to("cpu", torch.float16) if any(self.slots[s].req.keep_hidden for s in rows) else None
            for s in rows:
                slot = self.slots[s]
                if slot.req.keep_hidden:
                    slot.hidden.append(h_cpu[s:s + 1])
                if slot.done:
                    yield self._finish(s)
                    continue
                self._take(slot, picks[s])
                if slot.done and not slot.req.keep_hidden:
                    yield self._finish(s)
