"""The C++ decoder stack (decoder_stack.py) computes what the lean forward computes op by op, bit for bit,
on models whose weights are GGUF blocks (as the default model's are); it is rebuilt when a weight changes,
and steps aside where a weight does not pack or a batch step covers several sequences."""

import pytest
import torch
from test_batch import drive
from test_cpu_matmul import _q8_0_values
from tiny import tiny_heads, tiny_model

from draftheads import cpu_matmul, decoder_stack, few_rows
from draftheads.acceptance import SamplingConfig
from draftheads.batch import BatchDecoder
from draftheads.cpu_matmul import MAX_ROWS
from draftheads.generate import Decoder, Stats
from draftheads.kvcache import SlotKVCache, TreeKVCache
from draftheads.tree import Tree, load_tree

pytestmark = pytest.mark.skipif(few_rows.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")
MIN = torch.finfo(torch.float32).min
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Counting:
    """A DecoderStack that counts its passes."""

    def __init__(self, inner):
        self.inner, self.calls, self.padded = inner, 0, 0

    def forward(self, *args):
        self.calls += 1
        self.padded += args[3].numel() > 0  # rows: the real rows' places, where some are padding
        return self.inner.forward(*args)


@pytest.fixture(params=["int8", "float32"])
def stacks(request, monkeypatch):
    """Every product of up to 64 rows on the packed kernel (what measure_packed finds on this project's CPU),
    with each setting of the activations (int8 rounds x in the Q4_1 products); the stacks built, each counting
    its passes."""
    monkeypatch.setattr(few_rows, "_ACTIVATIONS", request.param)
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu_matmul, "_ROUTES", {threads: dict.fromkeys(range(1, MAX_ROWS + 1), "rows")})
    monkeypatch.setattr(cpu_matmul, "_PACKED_ROWS", {threads: 64})
    built, build = [], decoder_stack.build

    def counting(fwd, fused):
        inner = build(fwd, fused)
        built.append(Counting(inner) if inner is not None else None)
        return built[-1]

    monkeypatch.setattr(decoder_stack, "build", counting)
    return built


def packed_model(arch: str, seed: int = 0):
    """A tiny model whose projections hold Q4_1 block values, as a GGUF file's dequantised weights do, but
    the last layer's down_proj Q8_0 (the format of the default model's output embedding); biases (Qwen2's
    q/k/v) nonzero."""
    model = tiny_model(arch, layers=3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 2)[-2] not in PROJECTIONS:
                continue
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith(f"layers.{len(model.model.layers) - 1}.mlp.down_proj.weight"):
                p.copy_(_q8_0_values(*p.shape, g))
            else:
                p.copy_(few_rows.q4_1_values(*p.shape, g))
    return model


def passes(decoder: Decoder, stack: bool, monkeypatch, kv_dtype=None) -> list[torch.Tensor]:
    """A 20-token prefill, a medusa16 tree pass and three one-token steps: their hidden states and the cache
    (keys and values stored in kv_dtype; None: the model's)."""
    monkeypatch.setattr(decoder_stack, "ENABLED", stack)
    g = torch.Generator().manual_seed(1)
    prompt, tt = torch.randint(0, 200, (20,), generator=g), load_tree("medusa16", 3).tensors("cpu", torch.float32)
    cands = torch.randint(0, 200, (tt.depths.numel(),), generator=g)
    cache, fwd = TreeKVCache.for_model(decoder.model, 64, kv_dtype), decoder.engine._forward
    with torch.inference_mode():
        out = [fwd(cache, prompt, torch.arange(20), torch.full((20, 20), MIN).triu(1)),
               fwd(cache, cands, tt.depths + 20, tt.tree_bias)]
        cache.keep([0, 1], 20)
        cache.reserve(80)  # a new tensor: the stack must write into the new one's views
        out += [fwd(cache, torch.tensor([7 + i]), torch.tensor([22 + i]), tt.tree_bias[:1, :1]) for i in range(3)]
    return out + [cache.kv[..., :cache.length, :].clone()]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_the_stack_computes_what_the_ops_one_by_one_compute(arch, kv_dtype, stacks, monkeypatch):
    """Also with the cache in float16: the stack rounds each key and value to the nearest half as torch's copy
    does, and both attend over the same halves."""
    model = packed_model(arch)
    assert {few_rows.packed(m.weight).kind for m in model.modules() if type(m).__name__ == "Linear" and m is not model.lm_head
            } == {"q4_1", "q8_0"} and (arch != "qwen2" or model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0)
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu_matmul, "_PACKED_ROWS", {threads: 20})  # the prefill's rows: the stack's limit too
    decoder = Decoder(model)
    appends = []
    append = TreeKVCache.append
    monkeypatch.setattr(TreeKVCache, "append", lambda self, *a: appends.append(1) or append(self, *a))
    with_stack = passes(decoder, True, monkeypatch, kv_dtype)
    assert len(stacks) == 1 and stacks[0].calls == 5 and not appends  # every pass in one call, no layer by layer
    by_ops = passes(decoder, False, monkeypatch, kv_dtype)
    assert stacks[0].calls == 5 and appends
    assert with_stack[-1].dtype == by_ops[-1].dtype == kv_dtype
    for a, b in zip(with_stack, by_ops, strict=True):
        assert torch.equal(a, b)


def test_a_changed_weight_rebuilds_the_stack_and_one_that_does_not_pack_sets_it_aside(stacks, monkeypatch):
    model = packed_model("llama")
    decoder = Decoder(model)
    passes(decoder, True, monkeypatch)
    o = model.model.layers[1].self_attn.o_proj.weight
    with torch.no_grad():
        o.copy_(few_rows.q4_1_values(*o.shape, torch.Generator().manual_seed(5)))  # in place: the same storage
    with_stack = passes(decoder, True, monkeypatch)
    assert len(stacks) == 2 and stacks[1].calls == 5
    assert all(torch.equal(a, b) for a, b in zip(with_stack, passes(decoder, False, monkeypatch), strict=True))
    o.data = o.data.t().contiguous().t()  # the same values, not contiguous: cpu_matmul does not pack it
    with_stack = passes(decoder, True, monkeypatch)
    assert len(stacks) == 3 and stacks[2] is None
    assert all(torch.equal(a, b) for a, b in zip(with_stack, passes(decoder, False, monkeypatch), strict=True))
    o.data = o.data.contiguous()
    with torch.no_grad():
        o.add_(1e-3 * torch.randn(o.shape, generator=torch.Generator().manual_seed(6)))  # no block format holds it
    with_stack = passes(decoder, True, monkeypatch)
    assert len(stacks) == 4 and stacks[3] is None
    assert all(torch.equal(a, b) for a, b in zip(with_stack, passes(decoder, False, monkeypatch), strict=True))


@pytest.mark.parametrize("write", ["one fused projection", "load_state_dict"])
def test_an_in_place_write_after_decoding_reaches_the_packed_products(write, stacks, monkeypatch):
    """Decoding fuses q/k/v and gate/up in inference mode and packs them: a weight written in place afterwards
    (one projection's, or every weight by load_state_dict) must be packed again, as a model loaded with the new
    weights computes (a parameter re-pointed to a view of the fused tensor counts its writes apart from it)."""
    model, reference = packed_model("llama"), packed_model("llama")
    decoder = Decoder(model)
    passes(decoder, True, monkeypatch)
    with torch.no_grad():
        if write == "load_state_dict":
            new = packed_model("llama", seed=1)
            model.load_state_dict(new.state_dict())
            reference.load_state_dict(new.state_dict())
        else:
            k = lambda m: m.model.layers[1].self_attn.k_proj.weight  # noqa: E731
            w = few_rows.q4_1_values(*k(model).shape, torch.Generator().manual_seed(5))
            k(model).copy_(w)
            k(reference).copy_(w)
    after = passes(decoder, True, monkeypatch)
    assert len(stacks) == 2 and stacks[1] is not None and stacks[1].calls == 5
    assert all(torch.equal(a, b) for a, b in zip(after, passes(Decoder(reference), True, monkeypatch), strict=True))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tree_rows_through_the_stack_equal_plain_steps_bit_for_bit(arch, stacks):
    """Greedy speculation on the stack cannot differ from plain decoding on it: each node of a branching
    tree gets exactly the hidden state a plain step at its position computes."""
    decoder = Decoder(packed_model(arch))
    tree = load_tree("medusa16", 3)
    tt = tree.tensors("cpu", torch.float32)
    g = torch.Generator().manual_seed(2)
    prompt, cands = torch.randint(0, 200, (13,), generator=g), torch.randint(0, 200, (tree.size,), generator=g)

    def prefilled() -> TreeKVCache:
        cache = TreeKVCache.for_model(decoder.model, 64)
        decoder.engine._forward(cache, prompt, torch.arange(13), torch.full((13, 13), MIN).triu(1))
        return cache

    with torch.inference_mode():
        verified = decoder.engine._forward(prefilled(), cands, tt.depths + 13, tt.tree_bias)  # [nodes, hidden]
        for leaf in set(range(tree.size)) - set(tree.parent):
            cache = prefilled()
            for depth, node in enumerate(tree.path_to(leaf)):
                step = decoder.engine._forward(cache, cands[node:node + 1], torch.tensor([13 + depth]), tt.tree_bias[:1, :1])
                assert torch.equal(step[0], verified[node]), (leaf, node)
    assert stacks[0].calls > 0


def test_speculative_and_batched_decoding_on_the_stack_equal_plain_decoding(stacks, monkeypatch):
    """The loop with heads, and batch steps (SlotKVCache) of one sequence or of two of different lengths,
    padded to the larger tree, give the plain loop's tokens."""
    model = packed_model("qwen2")
    heads = tiny_heads(model, num_heads=3)
    prompts = [torch.randint(0, 200, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 21)]

    def alone(decoder: Decoder, prompt: list[int]) -> list[int]:
        out = []
        for step in decoder.steps(prompt, 30, SamplingConfig(), Stats()):
            out += step
        return out[:30]

    plain = [alone(Decoder(model), p) for p in prompts]
    assert [alone(Decoder(model, heads, load_tree("medusa16", 3)), p) for p in prompts] == plain
    appends, append = [], SlotKVCache.append
    monkeypatch.setattr(SlotKVCache, "append", lambda self, *a: appends.append(1) or append(self, *a))
    for slots in (1, 2):  # one slot: each sequence alone in its steps; two: both in one pass
        used = sum(s.calls for s in stacks)
        batch = BatchDecoder(Decoder(model, heads, load_tree("medusa16", 3)), slots=slots, capacity=128, draft_confidence=0.0)
        trees = [load_tree("medusa16", 3), Tree([[0], [1], [0, 0]])]  # of 16 and 4 nodes: padded rows
        assert drive(batch, [(p, SamplingConfig(), t) for p, t in zip(prompts, trees)], 30) == plain
        assert sum(s.calls for s in stacks) > used + 2 and not appends  # the steps too, none layer by layer
    assert sum(s.padded for s in stacks) > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_prompt_longer_than_the_packed_rows_is_prefilled_in_pieces_that_compute_the_same_keys(arch, monkeypatch):
    """Past cpu_matmul.packed_rows a prefill's products would leave the packed kernel: the engine and the batch's
    PrefillChunks prefill such a prompt in pieces of that many rows. Each row computes what it computes in a
    prefill whose pieces are larger (the same kernels; the masked keys add exact zeros), and greedy decoding after
    it is plain decoding's."""
    from draftheads.llama_forward import LlamaForward

    model = packed_model(arch)
    threads = torch.get_num_threads()
    prompt = torch.randint(0, 200, (23,), generator=torch.Generator().manual_seed(4))
    forwards, hidden = [], LlamaForward.hidden
    monkeypatch.setattr(LlamaForward, "hidden", lambda self, c, ids, *a, **k: forwards.append(ids.numel()) or hidden(self, c, ids, *a, **k))
    runs = {}
    cpu_matmul.routes()  # measured (or read) first, so that the limit set below stays
    for rows in (24, 5):  # the whole prompt in one forward, then in pieces of 5 rows (5 + 5 + 5 + 5 + 3)
        monkeypatch.setattr(cpu_matmul, "_PACKED_ROWS", {threads: rows})
        decoder = Decoder(model)
        assert decoder.lean.prefill_rows() == rows
        forwards.clear()
        cache, slots = decoder.engine.new_cache(40), SlotKVCache.for_model(model, 2, 40)
        with torch.inference_mode():
            h, logits = decoder.engine.prefill(cache, prompt)
            chunks = list(decoder.lean.prefill_slot_chunks(slots, 1, prompt, 8))
        runs[rows] = (list(forwards), h, logits, cache.kv[..., :23, :].clone(), slots.kv[:, :, 1, :, :23].clone(), chunks)
        out = [t for step in decoder.steps(prompt.tolist(), 6, SamplingConfig(), Stats()) for t in step][:6]
        assert out == [t for step in Decoder(model).steps(prompt.tolist(), 6, SamplingConfig(), Stats()) for t in step][:6]
    whole, pieces = runs[24], runs[5]
    assert whole[0][0] == 23 and pieces[0][:5] == [5, 5, 5, 5, 3]  # the engine's forwards
    assert pieces[0][5:] == [5, 3, 5, 3, 5, 2] and pieces[5] == [8, 16, 23]  # the batch's chunks of 8, in pieces of 5
    for a, b in zip(whole[1:5], pieces[1:5]):
        assert torch.equal(a, b)
