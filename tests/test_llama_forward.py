"""The lean Llama-family forward computes what transformers' forward computes, for every supported
architecture, and other models are refused (they run the generic path)."""

import pytest
import torch

from draftheads.generate import Decoder
from draftheads.kvcache import TreeKVCache
from draftheads.llama_forward import unsupported_reason
from draftheads.tree import load_tree
from tiny import ARCHS, tiny_model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lean_forward_equals_transformers_forward(arch):
    model = tiny_model(arch)
    decoder = Decoder(model)
    assert decoder.lean is not None
    prompt = torch.randint(0, 200, (20,), generator=torch.Generator().manual_seed(0))
    tt = load_tree("medusa16", 3).tensors("cpu", torch.float32)
    cands = torch.randint(0, 200, (tt.depths.numel(),), generator=torch.Generator().manual_seed(1))
    causal = torch.full((20, 20), torch.finfo(torch.float32).min).triu(1)

    outputs = {}
    for path in ("lean", "generic"):
        if path == "generic":
            decoder.lean = None
        cache = TreeKVCache.for_model(model, 64)
        prefill = decoder.engine._forward(cache, prompt, torch.arange(20), causal, verify=False)  # [20, hidden]
        tree = decoder.engine._forward(cache, cands, tt.depths + 20, tt.tree_bias)  # [nodes, hidden]
        cache.keep([0], 20)
        one = decoder.engine._forward(cache, cands[:1], torch.tensor([21]), tt.tree_bias[:1, :1])  # [1, hidden]
        outputs[path] = [decoder.logits(h) for h in (prefill, tree, one)] + [cache.kv[:, :, :, :, :22]]
    for lean, generic in zip(outputs["lean"], outputs["generic"]):
        torch.testing.assert_close(lean, generic, rtol=1e-4, atol=1e-4)
    # And the generic path is transformers' own forward: check the prefill's logits against it.
    torch.testing.assert_close(outputs["lean"][0], model(prompt.view(1, -1)).logits[0], rtol=1e-4, atol=1e-4)


def test_other_models_take_the_generic_path():
    sliding = tiny_model("mistral")
    sliding.config.sliding_window = 16
    assert unsupported_reason(sliding) == "sliding-window attention"
    assert Decoder(sliding).lean is None
    gpt2 = type("M", (), {"config": type("C", (), {"model_type": "gpt2"})()})()
    assert "gpt2" in unsupported_reason(gpt2)


def test_fused_projections_follow_the_model_weights(tmp_path):
    """On a CPU in fp32 q/k/v and gate/up run as one product each over views of the modules' weights: no copy,
    in-place updates reach the forward, replaced weights are fused again, and the model still saves."""
    model = tiny_model("qwen2")  # q/k/v with biases
    decoder = Decoder(model)
    lean = decoder.lean
    assert lean.fuse
    ids, pos = torch.arange(5, 12), torch.arange(7)

    def lean_and_generic():
        out = []
        for path in (lean, None):
            decoder.lean = path
            out.append(decoder.engine._forward(TreeKVCache.for_model(model, 16), ids, pos,
                                               torch.full((7, 7), torch.finfo(torch.float32).min).triu(1), verify=False))
        decoder.lean = lean
        return out

    lean_and_generic()
    attn = model.model.layers[1].self_attn
    (w, b), _ = lean._fused[1]
    assert attn.k_proj.weight.data_ptr() == w[attn.q_proj.weight.shape[0]:].data_ptr()  # a view, not a copy
    with torch.no_grad():
        attn.k_proj.weight.mul_(3.0)  # in place: the fused product sees it
        attn.v_proj.bias.add_(1.0)
    torch.testing.assert_close(*lean_and_generic(), rtol=1e-4, atol=1e-4)
    state = {k: v.clone() * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new parameter tensors: fused again on the next forward
    fused, generic = lean_and_generic()
    torch.testing.assert_close(fused, generic, rtol=1e-4, atol=1e-4)
    assert lean._fused[1][0][0].data_ptr() == model.model.layers[1].self_attn.q_proj.weight.data_ptr()
    model.save_pretrained(tmp_path)  # disjoint views of one tensor save as separate tensors
    again = type(model).from_pretrained(tmp_path)
    for (k, v), (_, u) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, u), k


def test_engines_on_one_model_share_its_lean_forward(monkeypatch):
    """Two decoders on one backbone (bench's loop and heads) share one LlamaForward: fusing re-points the
    modules' weights, so two instances taking turns re-fused every weight at each turn (0.4-0.7 s a switch)."""
    from draftheads import llama_forward

    fused = []
    fuse = llama_forward.fuse_linears
    monkeypatch.setattr(llama_forward, "fuse_linears", lambda modules: fused.append(1) or fuse(modules))
    model = tiny_model("llama")
    first, second = Decoder(model), Decoder(model)
    assert first.lean is second.lean and Decoder(tiny_model("llama")).lean is not first.lean
    prompt = torch.randint(0, 200, (6,), generator=torch.Generator().manual_seed(0))
    causal = torch.full((6, 6), torch.finfo(torch.float32).min).triu(1)
    with torch.inference_mode():
        for decoder in (first, second, first, second):
            decoder.engine._forward(TreeKVCache.for_model(model, 16), prompt, torch.arange(6), causal)
    assert len(fused) == 2 * len(model.model.layers)  # q/k/v and gate/up of each layer, once
