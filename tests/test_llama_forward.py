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
