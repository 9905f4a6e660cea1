"""More pins for planted bugs that the end-to-end tests let through (docs/mutation.md): heads, checkpoints,
tree search, the KV cache, the decoding loop, batched decoding and the server's validation.

Round trips (save, load, draft, compare) cannot see a bug both sides share, so the heads are checked
here against their math written out; error messages are matched whole.
"""

import pytest
import torch
from tiny import tiny_model

from draftheads.errors import UserError
from draftheads.heads import HeadsConfig, MedusaHeads
from draftheads.tree import load_tree


def _randomised(heads, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    for p in heads.parameters():
        p.data = torch.randn(p.shape, generator=g) * scale
    return heads.eval().requires_grad_(False)


# ---------------------------------------------------------------- Medusa heads

def test_heads_config_errors_name_every_key_and_the_known_values():
    base = {"num_heads": 2, "hidden_size": 8, "vocab_size": 16}
    with pytest.raises(UserError, match="^unknown keys in heads config: colour, size$"):
        HeadsConfig.from_dict({**base, "size": 1, "colour": "red"})
    with pytest.raises(UserError, match="^heads config lacks num_heads, vocab_size$"):
        HeadsConfig.from_dict({"hidden_size": 8})
    assert HeadsConfig.from_dict({**base, "lm_head": "shared"}).lm_head == "shared"
    with pytest.raises(UserError, match="^heads config: lm_head must be 'own' or 'shared', not 'tied'$"):
        HeadsConfig.from_dict({**base, "lm_head": "tied"})
    with pytest.raises(UserError, match=r"^heads of type 'eagle' are not supported \(known: medusa, hydra, hydra\+\+\)$"):
        HeadsConfig.from_dict({**base, "head_type": "eagle"})
    assert HeadsConfig.from_dict({**base, "batch_trees": {"1": [[0]], "16": []}}).batch_trees == {"1": [[0]], "16": []}
    for bad in (["8"], {8: [[0]]}, {"0": [[0]]}, {"x": [[0]]}, {"-1": [[0]]}):  # JSON keys are digit strings >= 1
        with pytest.raises(UserError, match=r'^heads config: batch_trees must map batch sizes \("1", "8", \.\.\.\) '
                                            r'to trees$'):
            HeadsConfig.from_dict({**base, "batch_trees": bad})


def test_medusa_heads_are_residual_blocks_and_drafts_are_full_ids():
    """Each head: x + SiLU(W x + b) per layer, then its LM head over the kept rows; drafts map the
    trimmed top-k back to full ids (a sign flip in the block or an unmapped id changes the drafts)."""
    cfg = HeadsConfig(num_heads=3, hidden_size=8, vocab_size=40, num_layers=2, trimmed_vocab=12)
    heads = _randomised(MedusaHeads(cfg))
    heads.vocab_map.copy_(torch.randperm(40, generator=torch.Generator().manual_seed(1))[:12])
    h = torch.randn(8, generator=torch.Generator().manual_seed(2))
    want = []
    for k, block in enumerate(heads.blocks):
        x = h
        for layer in block:
            x = x + torch.nn.functional.silu(x @ layer.linear.weight.T + layer.linear.bias)
        want.append(x @ heads.lm_heads[k].weight.T)
    torch.testing.assert_close(heads(h), torch.stack(want))
    tree = load_tree("medusa16", 3)
    ids = heads.draft(h, torch.tensor(39), tree)
    top = torch.stack(want).topk(tree.topk, dim=-1).indices  # trimmed ids [heads, topk]
    assert ids[0] == 39
    for node, path in enumerate(tree.paths, start=1):
        assert ids[node] == heads.vocab_map[top[len(path) - 1, path[-1]]], (node, path)
    assert set(ids[1:].tolist()) <= set(heads.vocab_map.tolist())


def test_shared_lm_head_needs_attach_and_takes_the_kept_backbone_rows():
    model = tiny_model()
    cfg = HeadsConfig(num_heads=2, hidden_size=64, vocab_size=model.config.vocab_size, lm_head="shared",
                      trimmed_vocab=20)
    heads = _randomised(MedusaHeads(cfg))
    assert heads.lm_heads is None
    with pytest.raises(AssertionError, match=r"^call attach\(backbone\) before drafting with a shared LM head$"):
        heads(torch.zeros(64))
    heads.vocab_map.copy_(torch.arange(100, 120))
    heads.attach(model)
    w = model.get_output_embeddings().weight
    assert torch.equal(heads.shared_weight, w[100:120])
    x = torch.randn(64)
    torch.testing.assert_close(heads.lm_logits(1, x), w[100:120] @ x)


# ---------------------------------------------------------------- Hydra heads

def _hydra(model, head_type="hydra", num_layers=2, lm_head="own", seed=0, grounded_residual="projection"):
    from draftheads.heads import HydraHeads

    cfg = HeadsConfig(num_heads=3, hidden_size=64, vocab_size=model.config.vocab_size, num_layers=num_layers,
                      head_type=head_type, lm_head=lm_head, grounded_residual=grounded_residual)
    return _randomised(HydraHeads(cfg), seed, scale=0.1).attach(model)


def test_hydra_head_is_its_math_written_out():
    """Head k: [h, E(x1..x_{k+1})] -> res(x) + SiLU(W x + b), then (L - 1) residual blocks, then its LM head."""
    model = tiny_model()
    heads = _hydra(model, num_layers=3)
    assert all(len(block) == 3 for block in heads.blocks)
    E = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(4)
    h = torch.randn(5, 64, generator=g)
    for k in range(3):
        path = torch.randint(0, 250, (5, k + 1), generator=g)
        first, *rest = heads.blocks[k]
        x = torch.cat([h, E[path].flatten(1)], -1)
        x = x @ first.res.weight.T + torch.nn.functional.silu(x @ first.linear.weight.T + first.linear.bias)
        for layer in rest:
            x = x + torch.nn.functional.silu(x @ layer.linear.weight.T + layer.linear.bias)
        torch.testing.assert_close(heads.head(k, h, path), x @ heads.lm_heads[k].weight.T)
    with pytest.raises(AssertionError):
        heads.head(1, h, path)  # a path of 3 tokens is head 2's, not head 1's


def test_hydra_head_with_the_hidden_residual_adds_h_itself_and_has_half_the_first_block():
    """grounded_residual="hidden": [h, E(x1..x_{k+1})] -> h + SiLU(W x + b); no residual projection stored."""
    model = tiny_model()
    heads = _hydra(model, num_layers=1, grounded_residual="hidden")
    projected = _hydra(model, num_layers=1)
    E = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(4)
    h = torch.randn(5, 64, generator=g)
    for k in range(3):
        path = torch.randint(0, 250, (5, k + 1), generator=g)
        first = heads.blocks[k][0]
        assert first.res is None
        x = torch.cat([h, E[path].flatten(1)], -1)
        x = h + torch.nn.functional.silu(x @ first.linear.weight.T + first.linear.bias)
        torch.testing.assert_close(heads.head(k, h, path), x @ heads.lm_heads[k].weight.T)
    block_params = sum(p.numel() for p in heads.blocks.parameters())
    assert block_params + sum(64 * 64 * (k + 2) for k in range(3)) == sum(p.numel() for p in projected.blocks.parameters())
    with pytest.raises(UserError, match=r"^heads config: grounded_residual must be 'projection' or 'hidden', not 'x'$"):
        HeadsConfig.from_dict({"num_heads": 2, "hidden_size": 8, "vocab_size": 16, "grounded_residual": "x"})


def test_hydra_forward_on_whole_sequences_runs_the_prefix_layer_then_selects():
    model = tiny_model()
    heads = _hydra(model, "hydra++")
    g = torch.Generator().manual_seed(5)
    hidden, path = torch.randn(2, 6, 64, generator=g), torch.randint(0, 250, (2, 6, 3), generator=g)
    select = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    got = heads(hidden, path, select)  # [K, N, vocab]
    h = heads.prefix_states(hidden)[select]
    assert got.shape == (3, int(select.sum()), model.config.vocab_size)
    for k in range(3):
        torch.testing.assert_close(got[k], heads.head(k, h, path[select][:, :k + 1]))
    # The attention mask reaches the prefix layer: left padding hidden by it changes nothing after it
    # (RoPE is relative, so the shifted positions do not matter).
    padded = torch.cat([torch.randn(1, 2, 64, generator=g) * 5, hidden[:1]], 1)
    mask = torch.tensor([[0, 0] + [1] * 6])
    torch.testing.assert_close(heads.prefix_states(padded, mask)[:, 2:], heads.prefix_states(hidden[:1]),
                               atol=1e-4, rtol=1e-4)


def test_hydra_plus_plus_prefix_layer_has_the_trained_architecture():
    """A wrong head count or norm epsilon computes another function with the same weights; other sizes
    would not load the weights trained heads were saved with."""
    from draftheads.heads.hydra import prefix_layer_config

    for hidden, n in ((32, 1), (64, 1), (192, 3)):
        c = prefix_layer_config(HeadsConfig(num_heads=2, hidden_size=hidden, vocab_size=10, head_type="hydra++"))
        assert type(c.num_attention_heads) is int and c.num_attention_heads == c.num_key_value_heads == n
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size) == (hidden, 2 * hidden, 1, 1)
        assert c.rms_norm_eps == 1e-5
    model = tiny_model()
    shapes = {k: tuple(v.shape) for k, v in _hydra(model, "hydra++").prefix.state_dict().items()}
    assert shapes == {"embed_tokens.weight": (1, 64), "layers.0.self_attn.q_proj.weight": (64, 64),
                      "layers.0.self_attn.k_proj.weight": (64, 64), "layers.0.self_attn.v_proj.weight": (64, 64),
                      "layers.0.self_attn.o_proj.weight": (64, 64), "layers.0.mlp.gate_proj.weight": (128, 64),
                      "layers.0.mlp.up_proj.weight": (128, 64), "layers.0.mlp.down_proj.weight": (64, 128),
                      "layers.0.input_layernorm.weight": (64,), "layers.0.post_attention_layernorm.weight": (64,),
                      "norm.weight": (64,)}


def test_hydra_state_checks_and_dtypes():
    from draftheads.heads import HydraHeads

    model = tiny_model()
    cfg = HeadsConfig(num_heads=3, hidden_size=64, vocab_size=model.config.vocab_size, head_type="hydra++")
    bare = HydraHeads(cfg)
    with pytest.raises(AssertionError, match=r"^call attach\(backbone\) first$"):
        bare.head(0, torch.zeros(1, 64), torch.zeros(1, 1, dtype=torch.long))
    heads = _hydra(model, "hydra++")
    tree = load_tree("medusa16", 3)
    with pytest.raises(AssertionError, match=r"^Hydra\+\+: observe\(\) the prompt's hidden states before drafting$"):
        heads.draft(torch.zeros(64), torch.tensor(1), tree)
    # Without reset(): a fresh head's cache starts empty and grows with each observe().
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(6))
    heads.observe(x[:4])
    heads.observe(x[4:])
    torch.testing.assert_close(heads._last, heads.prefix_states(x[None])[0, -1], atol=1e-4, rtol=1e-4)
    # A shared LM head: the backbone's output rows, given by attach().
    shared = _hydra(model, lm_head="shared")
    h = torch.randn(2, 64)
    torch.testing.assert_close(shared.lm_logits(0, h), h @ model.get_output_embeddings().weight.T)
    # bf16 heads on an fp32 backbone: the path's embeddings follow the heads' dtype.
    low = _hydra(model).to(torch.bfloat16)
    assert low.draft(torch.randn(64), torch.tensor(3), tree).shape == (tree.size,)


# ---------------------------------------------------------------- heads on disk

def _medusa(model, layers=1, lm_head="own", trimmed=None, seed=3, backbone="tiny"):
    from draftheads.backbone import output_embedding_fingerprint

    cfg = HeadsConfig(num_heads=2, hidden_size=64, vocab_size=model.config.vocab_size, num_layers=layers,
                      lm_head=lm_head, trimmed_vocab=trimmed, backbone=backbone,
                      backbone_fingerprint=output_embedding_fingerprint(model))
    return _randomised(MedusaHeads(cfg), seed, scale=0.05).attach(model)


def _official(heads, prefix=""):
    """The official Medusa layout's keys: <head>.<layer>.linear.weight|bias, <head>.<layers>.weight."""
    state = {}
    for h, block in enumerate(heads.blocks):
        for l, layer in enumerate(block):
            state[f"{prefix}{h}.{l}.linear.weight"] = layer.linear.weight.clone()
            state[f"{prefix}{h}.{l}.linear.bias"] = layer.linear.bias.clone()
        if heads.lm_heads is not None:
            state[f"{prefix}{h}.{len(block)}.weight"] = heads.lm_heads[h].weight.clone()
    return state


def _write(d, config, **files):
    """A heads directory: config.json and weights files (.safetensors, else torch.save)."""
    import json

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    for name, state in files.items():  # medusa_lm_head__pt: medusa_lm_head.pt
        path = d / name.replace("__", ".")
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, path)
        else:
            torch.save(state, path)
    return d


@torch.inference_mode()  # as heads draft: a product that needs gradients takes another kernel (cpu_matmul.linear)
def _same_logits(a, b):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_save_heads_writes_beside_the_target_and_cleans_up(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    from safetensors import safe_open

    from draftheads.heads import save_heads

    heads = _medusa(tiny_model())
    renames, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((src, dst)), replace(src, dst))[1])
    out = save_heads(heads, tmp_path / "a" / "b")  # parents are made
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"] and len(renames) == 2
    for src, dst in renames:  # a hidden temporary beside the target: the rename stays on one file system
        assert Path(src).parent == Path(dst).parent == out and Path(src).name.startswith(f".{Path(dst).name}.")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers' loaders require of a safetensors file
    heads.cfg.backbone = object()  # a config that is no JSON: the write fails and leaves no temporary
    with pytest.raises(TypeError, match="is not JSON serializable"):
        save_heads(heads, tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["model.safetensors"]


def test_native_heads_errors_name_the_file_and_the_mismatch(tmp_path):
    import re

    from safetensors.torch import load_file, save_file

    from draftheads.heads import load_heads, save_heads

    model = tiny_model()
    d = save_heads(_medusa(model), tmp_path / "h")
    (d / "config.json").write_text("{bad")
    with pytest.raises(UserError, match=f"^{re.escape(str(d / 'config.json'))} is not valid JSON: Expecting"):
        load_heads(d)
    save_heads(_medusa(model), d)
    state = load_file(d / "model.safetensors")
    del state["lm_heads.0.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(UserError, match=rf"^weights in {re.escape(str(d))} do not match their config: "
                                        r"Error\(s\) in loading state_dict for MedusaHeads:$"):
        load_heads(d)
    (d / "model.safetensors").write_bytes(b"torn")
    with pytest.raises(UserError, match=f"^cannot read {re.escape(str(d / 'model.safetensors'))}: "):
        load_heads(d)
    for name, shown in (("tiny", "tiny"), ("", "unknown")):
        d = save_heads(_medusa(model, backbone=name), tmp_path / f"h{name}")
        with pytest.raises(UserError) as e:
            load_heads(d, tiny_model(hidden=32))
        assert str(e.value) == (f"heads in {d} are for a backbone with vocab 259 and hidden size 64, this one has "
                                f"259 and 32 ({shown})")
    with pytest.raises(UserError) as e:
        load_heads(d, tiny_model(seed=1))
    assert str(e.value) == (f"heads in {d} were trained for backbone '', whose output embedding differs from this "
                            "backbone's: load the backbone they were trained on")


def test_medusa2_heads_refuse_the_untuned_backbone_by_name(tmp_path):
    """A tuned fingerprint written out by hand: four weights the adapter moved by 0.5."""
    from draftheads.adapter import refusal
    from draftheads.heads import load_heads, save_heads

    tuned = tiny_model()
    w = tuned.get_parameter("model.layers.0.self_attn.q_proj.weight")
    fp = [{"weight": "model.layers.0.self_attn.q_proj.weight", "index": [i, 2 * i], "delta": 0.5,
           "tuned": float(w[i, 2 * i])} for i in range(4)]
    heads = _medusa(tuned)
    heads.cfg.adapter, heads.cfg.tuned_fingerprint = "../adapter", fp
    d = save_heads(heads, tmp_path / "h")
    assert load_heads(d, tuned).cfg.tuned_fingerprint == fp
    untuned = tiny_model()
    with torch.no_grad():
        for e in fp:
            untuned.get_parameter(e["weight"])[tuple(e["index"])] -= 0.5
    with pytest.raises(UserError) as e:
        load_heads(d, untuned)
    assert str(e.value) == refusal(heads.cfg, "untuned", d) and "(untuned)" in str(e.value)


def test_official_layout_defaults_identity_and_shared_heads(tmp_path):
    import re

    from draftheads.heads import load_heads

    model = tiny_model()
    heads = _medusa(model)
    fp = heads.cfg.backbone_fingerprint
    # The official config and weights beside another model.safetensors: still the official layout. No
    # medusa_num_layers: 1; no base_model_name_or_path: no name; key prefix "medusa_head." dropped.
    d = _write(tmp_path / "o", {"medusa_num_heads": 2},
               medusa_lm_head__safetensors=_official(heads, "medusa_head."), model__safetensors={"x": torch.zeros(1)})
    got = load_heads(d, model)
    assert (got.cfg.num_layers, got.cfg.backbone, got.cfg.lm_head, got.cfg.vocab_size) == (1, "", "own", 259)
    assert got.cfg.tuned_fingerprint == [] and got.cfg.backbone_fingerprint == []
    _same_logits(heads, got)
    # The name: base_model_name_or_path, unless our own export recorded one under "draftheads".
    ours = {"backbone_fingerprint": fp, "tuned_fingerprint": [{"weight": "w", "index": [0, 0], "delta": 1.0,
                                                                "tuned": 1.0}]}
    for extra, name in (({}, "tiny-base"), ({"draftheads": {**ours, "backbone": "ours"}}, "ours"),
                        ({"draftheads": {**ours, "backbone": ""}}, "tiny-base")):
        _write(d, {"medusa_num_heads": 2, "base_model_name_or_path": "tiny-base", **extra})
        got = load_heads(d)
        assert got.cfg.backbone == name
        if extra:
            assert got.cfg.backbone_fingerprint == fp and got.cfg.tuned_fingerprint == ours["tuned_fingerprint"]
    # Shared LM heads ("version 2"): the vocabulary comes from the backbone, unless the config records one.
    s = _write(tmp_path / "s", {"medusa_num_heads": 2, "medusa_num_layers": 1},
               medusa_lm_head__pt=_official(_medusa(model, lm_head="shared")))
    assert load_heads(s).cfg.vocab_size == 0
    got = load_heads(s, model)
    assert got.cfg.lm_head == "shared" and got.cfg.vocab_size == 259
    _write(s, {"medusa_num_heads": 2, "vocab_size": 100})
    assert load_heads(s).cfg.vocab_size == 100
    with pytest.raises(UserError, match="^heads in .* are for a backbone with vocab 100 and hidden size 64"):
        load_heads(s, model)
    # Errors name the file and the problem.
    e = _write(tmp_path / "e", {"medusa_num_heads": 2})
    with pytest.raises(UserError, match=f"^{re.escape(str(e))} has neither model.safetensors nor "
                                        r"medusa_lm_head.safetensors/.pt$"):
        load_heads(e)
    state = _official(heads)
    del state["0.0.linear.weight"]
    _write(e, {"medusa_num_heads": 2}, medusa_lm_head__safetensors=state)
    with pytest.raises(UserError, match=r"\(<head>.<layer>.linear.weight, <head>.<layers>.weight\): "
                                        r"KeyError '0.0.linear.weight'$"):
        load_heads(e)
    state = _official(heads)
    state["1.1.weight"] = torch.zeros(259, 32)
    f = e / "medusa_lm_head.safetensors"
    _write(e, {"medusa_num_heads": 2}, medusa_lm_head__safetensors=state)
    with pytest.raises(UserError, match=f"^weights in {re.escape(str(f))} do not match their config: "):
        load_heads(e)
    f.unlink()
    _write(e, {"medusa_num_heads": 2}, medusa_lm_head__pt={"0.0.linear.weight": torch.zeros(2, 2), "evil": print})
    with pytest.raises(UserError, match=f"^cannot read {re.escape(str(e / 'medusa_lm_head.pt'))} safely: "
                                        r"Weights only load failed\."):
        load_heads(e)


def _vllm(heads, prefix="", bias=True, lm=True):
    """vLLM's Medusa keys: blocks.<h>.layers.<l>.weight|bias, lm_heads.<h>.weight."""
    state = {}
    for h, block in enumerate(heads.blocks):
        for l, layer in enumerate(block):
            state[f"{prefix}blocks.{h}.layers.{l}.weight"] = layer.linear.weight.clone()
            if bias:
                state[f"{prefix}blocks.{h}.layers.{l}.bias"] = layer.linear.bias.clone()
        if lm:
            state[f"{prefix}lm_heads.{h}.weight"] = heads.lm_heads[h].weight.clone()
    return state


def test_vllm_layout_counts_files_and_trimmed_heads(tmp_path):
    from draftheads.heads import load_heads

    model = tiny_model()
    heads = _medusa(model, layers=2)
    base = {"model_type": "medusa", "hidden_size": 64, "vocab_size": 259, "medusa_fc_bias": True}
    # Exact names win over the rename rule ("num" and "heads" / "layers" in a key), whatever the order.
    d = _write(tmp_path / "a", {**base, "num_attention_heads": 9, "num_heads": 2, "num_layers_backbone": 30,
                                "num_hidden_layers": 2}, model__bin=_vllm(heads, "medusa_heads."))
    _same_logits(heads, load_heads(d))
    # The rename rule alone, weights in a .pt; num_lookahead_tokens counts heads only when nothing else does.
    d = _write(tmp_path / "b", {**base, "medusa_num_heads": 2, "medusa_num_layers": 2, "num_lookahead_tokens": 5},
               model__pt=_vllm(heads))
    _same_logits(heads, load_heads(d))
    one = _medusa(model, layers=1)
    d = _write(tmp_path / "c", {**base, "num_lookahead_tokens": 2}, model__safetensors=_vllm(one))
    got = load_heads(d)
    assert (got.cfg.num_heads, got.cfg.num_layers, got.cfg.lm_head) == (2, 1, "own")
    _same_logits(one, got)
    # VocabTrim: lm heads stored over the full vocabulary keep the token_map's rows.
    token_map = torch.randperm(259, generator=torch.Generator().manual_seed(0))[:100]
    state = {**_vllm(one), "token_map": token_map}
    d = _write(tmp_path / "t", {**base, "num_heads": 2, "truncated_vocab_size": 100}, model__safetensors=state)
    got = load_heads(d)
    assert got.cfg.trimmed_vocab == 100 and torch.equal(got.vocab_map, token_map)
    torch.testing.assert_close(got.lm_heads[1].weight, one.lm_heads[1].weight[token_map], rtol=0, atol=0)


def test_vllm_layout_errors_name_the_file_and_the_key(tmp_path):
    import re

    from draftheads.heads import load_heads

    heads = _medusa(tiny_model())
    base = {"model_type": "medusa", "hidden_size": 64, "vocab_size": 259, "num_heads": 2}
    d = tmp_path / "v"

    def refused(config, message, **files):
        import shutil

        shutil.rmtree(d, ignore_errors=True)
        _write(d, config, **files)
        with pytest.raises(UserError) as e:
            load_heads(d)
        assert re.fullmatch(message.replace("DIR", re.escape(str(d))), str(e.value)), str(e.value)

    refused({"model_type": "medusa", "num_heads": 2},
            r"DIR/config.json: a vLLM Medusa config needs hidden_size and vocab_size")
    refused({"model_type": "medusa", "hidden_size": 64, "vocab_size": 259},
            r"DIR/config.json: a vLLM Medusa config needs num_heads")
    refused(base, r"DIR holds no .safetensors/.bin weights for its vLLM Medusa config")
    refused({**base, "truncated_vocab_size": 100}, r"DIR: truncated_vocab_size 100 < vocab_size 259 but there is no "
            r"token_map", model__safetensors=_vllm(heads))
    state = _vllm(heads)
    del state["blocks.1.layers.0.weight"]
    refused(base, r"DIR: weights lack blocks.1.layers.0.weight", model__safetensors=state)
    refused({**base, "medusa_fc_bias": True}, r"DIR: medusa_fc_bias is set but weights lack blocks.0.layers.0.bias",
            model__safetensors=_vllm(heads, bias=False))
    state = _vllm(heads)
    del state["lm_heads.1.weight"]
    refused(base, r"DIR: weights lack lm_heads.1.weight", model__safetensors=state)
    refused(base, r"weights in DIR do not match their config: Error\(s\) in loading state_dict for MedusaHeads:",
            model__safetensors={**_vllm(heads), "lm_heads.1.weight": torch.zeros(259, 32)})
    refused(base, r"cannot read DIR/model.pt safely: Weights only load failed\..*",
            model__pt={**_vllm(heads), "evil": print})


# ---------------------------------------------------------------- batched decoding


def _recording(heads):
    """heads whose drafts are logged as (root, hidden [H]) per sequence: what each sequence's drafter was
    given (draft() of one sequence and a batched step's draft_many() both go through draft_many)."""
    log, draft_many = [], heads.draft_many

    def logged(hidden, roots, tree):
        log.extend((int(r), h.clone()) for r, h in zip(roots, hidden))
        return draft_many(hidden, roots, tree)
    heads.draft_many = logged
    return heads, log


def _alone(decoder, prompt, n, sp, stats):
    from draftheads.generate import Stats

    out = []
    for step in decoder.steps(prompt, n, sp, stats if stats is not None else Stats()):
        out += step
        if len(out) >= n:
            break
    return out[:n]


@pytest.mark.parametrize("sampled,drafters", [(False, "heads+lookup"), (True, "heads+lookup"), (False, "heads"),
                                              (False, "lookup"), (False, "none")])
def test_a_batched_sequence_drafts_accepts_and_samples_as_it_does_alone(sampled, drafters, monkeypatch):
    """Per sequence, in a batch of three: the same tokens (a seeded sample too), the same steps, verified
    nodes and accepted drafts (heads, prompt lookup, both, neither), and its drafter given the same hidden
    state and root every step, where the batch leaves lookup's branches whole (its row share, BATCH_LOOKUP_ROWS,
    cuts them in a pass of several sequences: test_batch pins that)."""
    from test_lookup import PROMPT, echo_model
    from tiny import tiny_heads

    from draftheads import batch as batch_module
    from draftheads.acceptance import SamplingConfig
    from draftheads.batch import BatchDecoder
    from draftheads.generate import Decoder, Stats
    from draftheads.lookup import LookupConfig, PromptLookup

    monkeypatch.setattr(batch_module, "BATCH_LOOKUP_ROWS", 10**6)
    model = echo_model()
    prompts = [PROMPT, list(range(60, 75)) * 2, list(range(90, 99))]
    sps = [SamplingConfig(temperature=0.7, acceptance="exact", seed=s) if sampled else SamplingConfig()
           for s in (5, 6, 7)]
    heads, log = _recording(tiny_heads(model, num_heads=3)) if "heads" in drafters else (None, [])
    tree = load_tree("medusa8", 3) if heads is not None else None
    cfg = LookupConfig(branches=3, tokens=4)  # not the default settings: the batch must use these
    lookup = (lambda: PromptLookup(cfg)) if "lookup" in drafters else (lambda: None)
    alone_stats = [Stats() for _ in prompts]
    alone = [_alone(Decoder(model, heads, tree, lookup()), p, 30, sp, st)
             for p, sp, st in zip(prompts, sps, alone_stats)]
    alone_log, log[:] = list(log), []
    batch = BatchDecoder(Decoder(model, heads, tree, lookup()), slots=3, capacity=160, draft_confidence=0.0)
    nodes = 12 if "lookup" in drafters else 0  # 3 branches of 4 tokens
    assert batch.lookup_nodes == nodes and batch.context == 160 - (tree.size if tree else 1) - nodes
    stats = [Stats() for _ in prompts]
    got = [[] for _ in prompts]
    gens = [batch.steps(p, 30, sp, st) for p, sp, st in zip(prompts, sps, stats)]
    for k, g in enumerate(gens):
        got[k] += next(g)
    while any(gens):
        batch.step()
        for k, g in enumerate(gens):
            if g is not None:
                got[k] += next(g, [])
                if len(got[k]) >= 30:  # where the solo run stopped too
                    gens[k] = g.close()
    assert [o[:30] for o in got] == alone
    for a, b in zip(alone_stats, stats):
        assert (b.steps, b.accepted, b.nodes, b.lookup_accepted, b.prompt_tokens, b.tree_size) == \
               (a.steps, a.accepted, a.nodes, a.lookup_accepted, a.prompt_tokens, a.tree_size)
    if not sampled and "lookup" in drafters:
        assert sum(st.lookup_accepted for st in alone_stats) >= 5  # lookup branches were taken, in both
        assert sum(st.lookup_accepted for st in stats) >= sum(st.lookup_accepted for st in alone_stats)
    assert len(log) >= len(alone_log)
    for root, hidden in alone_log:  # every drafting state of the solo runs occurs in the batch
        assert any(r == root and torch.allclose(h, hidden, atol=1e-4) for r, h in log), root


def test_batch_decoder_messages_tables_and_prefill_time(monkeypatch):
    import itertools

    from tiny import tiny_heads, tiny_hydra_heads

    from draftheads.acceptance import SamplingConfig
    from draftheads.batch import BatchDecoder
    from draftheads.generate import Decoder, Stats
    from draftheads.tree import Tree

    model = tiny_model()
    generic = Decoder(model, tiny_heads(model))
    generic.lean = None
    with pytest.raises(UserError, match=r"^batched decoding runs on the lean forward \(Llama, Mistral, Qwen2\) or on "
                                        r"llama.cpp; this model decodes one request at a time$"):
        BatchDecoder(generic, slots=2, capacity=64, draft_confidence=0.0)
    small, big = Tree([[0]]), load_tree("medusa16", 3)
    with pytest.raises(AssertionError, match="^batch sizes start at 1$"):
        BatchDecoder(Decoder(model, tiny_heads(model), small), 2, 64, batch_trees={0: big}, draft_confidence=0.0)
    batch = BatchDecoder(Decoder(model, tiny_heads(model), small), 2, 64, batch_trees={2: big, 4: small}, draft_confidence=0.0)
    assert batch.tree_at(1, small) is big and batch.tree_at(3, small) is big and batch.tree_at(9, big) is small
    assert batch.context == 64 - big.size  # a sequence following the table reserves its largest tree
    named = batch.steps(list(range(60)), 2, SamplingConfig(), Stats(), small)  # 60 + 2 < 64 < 60 + 17
    assert len(next(named)) == 1  # a named tree reserves its own size only
    named.close()
    plain = BatchDecoder(Decoder(model, None), 2, 64, batch_trees={2: big}, draft_confidence=0.0)
    assert plain.batch_trees == [] and plain.context == 63 and plain.tree_at(2, Tree([])).size == 1
    # The prefill's time is its forward and its first token's: one tick of a clock that ticks per reading, each.
    clock = itertools.count(100)
    monkeypatch.setattr(batch.dec, "_sync", lambda: float(next(clock)))
    stats = Stats()
    gen = batch.steps(list(range(5, 12)), 4, SamplingConfig(), stats)
    next(gen)
    assert stats.prefill_s == 2.0
    gen.close()


def test_generate_many_with_replies_that_end_at_their_first_token():
    from tiny import tiny_draftmodel

    dm = tiny_draftmodel(tree="medusa16")
    prompts = ["hello there", "x", "count to ten"]
    many = dm.generate_many(prompts, max_batch=2, max_new_tokens=1)
    assert [len(r.token_ids) for r in many] == [1, 1, 1]
    assert [r.token_ids for r in many] == [dm.generate(p, max_new_tokens=1).token_ids for p in prompts]


# ---------------------------------------------------------------- the decoding loop's bookkeeping


def test_stats_add_up_every_step_and_report_a_sorted_histogram():
    from draftheads.generate import Stats
    from draftheads.tree import Tree

    s = Stats(new_tokens=6, total_s=2.0)
    tree = Tree([[0], [0, 0]])
    s.record(tree, [0, 1], 0.5, 1.0, 0.25)
    s.record(tree, [0], 0.25, 2.0, 0.5)
    s.record(tree, [0, 1, 2], 0.25, 1.0, 0.25)
    assert (s.steps, s.nodes, s.accepted) == (3, 9, [2, 1, 3])
    assert (s.draft_s, s.verify_s, s.accept_s) == (1.0, 4.0, 1.0)
    d = s.to_dict()
    assert "accepted" not in d and d["steps"] == 3 and d["mean_accepted"] == 2.0 and d["tokens_per_second"] == 3.0
    assert list(d["accepted_histogram"].items()) == [(1, 1), (2, 1), (3, 1)]
    s.record(tree, [0, 1], 0.0, 0.0, 0.0)
    assert s.to_dict()["accepted_histogram"] == {1: 1, 2: 2, 3: 1}


def test_decoder_takes_the_engine_given_and_drafts_only_with_a_drafter():
    from tiny import tiny_heads

    from draftheads.generate import ROOT_ONLY, Decoder

    model = tiny_model()
    plain = Decoder(model, tree=load_tree("chain3"))
    assert plain.drafter is None and plain.tree is ROOT_ONLY  # a tree without heads drafts nothing
    engine = plain.engine
    again = Decoder(model, tiny_heads(model), load_tree("chain3"), engine=engine)
    assert again.engine is engine and again.tree.size == 4 and again.drafter is not None


def test_teacher_topk_in_chunks_against_the_heads_math_and_from_bf16_heads():
    import copy

    model = tiny_model()
    g = torch.Generator().manual_seed(4)
    T, n = 70, 4  # more positions than hidden units: chunks run over the positions, not the features
    hidden, ids = torch.randn(T, 64, generator=g), torch.randint(0, 200, (T,), generator=g)
    for heads in (_medusa(model), _hydra(model, "hydra++")):
        K = heads.cfg.num_heads
        whole = heads.teacher_topk(hidden, ids, n)
        assert whole.shape == (K, T, n) and torch.equal(heads.teacher_topk(hidden, ids, n, chunk=2), whole)
        h = heads.prefix_states(hidden[None])[0] if hasattr(heads, "prefix_states") else hidden
        for k in range(K):
            for t in (0, 1, 5, 33, T - K - 1):  # the true path ids[t+1 .. t+1+k] lies inside the sequence
                logits = heads.head(k, h[t:t + 1], ids[t + 1:t + 2 + k][None])[0] if hasattr(heads, "head") \
                    else heads(hidden[t])[k]
                assert torch.equal(whole[k, t], logits.topk(n).indices), (type(heads).__name__, k, t)
        bf = copy.deepcopy(heads).to(torch.bfloat16)  # fp32 hidden states in, bf16 heads: cast on the way in
        assert bf.teacher_topk(hidden, ids, n).shape == (K, T, n)
        bf.reset()
        bf.observe(hidden)
        assert bf.draft(hidden[-1], ids[-1], load_tree("chain2")).shape == (3,)


def test_batched_steps_bounds_messages_and_the_end_of_a_sequence(monkeypatch):
    import itertools

    from tiny import tiny_heads

    from draftheads.acceptance import SamplingConfig
    from draftheads.batch import BatchDecoder
    from draftheads.generate import Decoder, Stats
    from draftheads.tree import Tree

    model = tiny_model()
    heads = tiny_heads(model, num_heads=3)
    chain = load_tree("chain3")
    # The default tree (chain2, 3 nodes) is smaller than the table's entry for one sequence (chain3, 4 nodes).
    batch = BatchDecoder(Decoder(model, heads, load_tree("chain2")), slots=1, capacity=32,
                         batch_trees={1: chain, 2: Tree([[0]])}, draft_confidence=0.0)
    sp = SamplingConfig()
    with pytest.raises(UserError, match="^the prompt is empty$"):
        next(batch.steps([], 4, sp, Stats()))
    one = batch.steps([7], 2, sp, Stats())
    assert len(next(one)) == 1  # a one-token prompt is a prompt
    with pytest.raises(AssertionError, match="^no free slot: the scheduler admits at most `slots` sequences$"):
        next(batch.steps([1, 2], 2, sp, Stats()))
    with pytest.raises(AssertionError, match=r"^next\(\) without a step\(\) in between$"):
        next(one)
    one.close()
    # The reserve of a sequence that follows the table is the table's largest tree: 4 nodes here.
    with pytest.raises(UserError, match="^the prompt has 28 tokens; a batch slot holds 32"):
        next(batch.steps(list(range(28)), 2, sp, Stats()))
    fits = batch.steps(list(range(27)), 2, sp, Stats())
    assert len(next(fits)) == 1
    fits.close()

    # To the end of a sequence: a tree step only while the tree fits before `end`, then plain steps, and
    # the sequence ends when its cache reaches `end` exactly (every token up to it emitted).
    stats, P = Stats(), 10
    gen = batch.steps(list(range(40, 40 + P)), 6, sp, stats)
    out = list(next(gen))
    seq = batch.seqs[0]
    assert seq.end == P + 6 + 4
    while True:
        L, nodes = int(batch.cache.lengths[0]), stats.nodes
        batch.step()
        step = next(gen, None)
        if step is None:
            break
        out += step
        assert (stats.nodes - nodes > 1) == (L + 4 <= seq.end), (L, stats.nodes - nodes)
        if seq.done:  # its cache reached `end` (L + the step's tokens), and its slot was released at once
            assert L + len(step) == seq.end and int(batch.cache.lengths[0]) == 0
            steps = stats.steps
            batch.step()  # a finished sequence whose tokens were handed out is not stepped again
            assert int(batch.cache.lengths[0]) == 0 and stats.steps == steps
    assert len(out) == seq.end - P + 1  # the last step's tokens too: as many as Decoder.steps gives alone
    solo = []
    for step in Decoder(model, heads, chain).steps(list(range(40, 40 + P)), 6, sp, Stats()):
        solo += step
        if len(solo) >= len(out):
            break
    assert out == solo

    # Time: a clock that ticks once per reading. Prefill in two chunks plus the first token: 3 ticks;
    # each step's draft, verify and accept phases: one tick each.
    chunked = BatchDecoder(Decoder(model, heads, chain), slots=2, capacity=64, prefill_chunk=4, draft_confidence=0.0)
    clock = itertools.count(100)
    monkeypatch.setattr(chunked.dec, "_sync", lambda: float(next(clock)))
    stats = Stats()
    gen = chunked.steps(list(range(5, 12)), 8, sp, stats)
    assert next(gen) == [] and len(next(gen)) == 1 and stats.prefill_s == 3.0
    chunked.step()
    next(gen)
    assert (stats.draft_s, stats.verify_s, stats.accept_s) == (1.0, 1.0, 1.0)
    gen.close()
    left = chunked.steps(list(range(5, 12)), 8, sp, Stats())
    assert next(left) == []
    left.close()  # gone during its prefill: its slot comes back
    assert sorted(chunked.free) == [0, 1] and not chunked.seqs


def test_the_row_budget_counts_lookup_nodes_and_holds_at_equality():
    from tiny import tiny_heads

    from draftheads.acceptance import SamplingConfig
    from draftheads.batch import BatchDecoder
    from draftheads.generate import Decoder, Stats
    from draftheads.lookup import LookupConfig, PromptLookup

    model = tiny_model()
    heads, chain = tiny_heads(model, num_heads=3), load_tree("chain3")
    for lookup, rows, tree_steps in ((None, 8, True), (None, 7, False), (LookupConfig(branches=1, tokens=2), 12, True),
                                     (LookupConfig(branches=1, tokens=2), 11, False)):
        batch = BatchDecoder(Decoder(model, heads, chain, PromptLookup(lookup) if lookup else None), slots=2,
                             capacity=64, max_rows=rows, draft_confidence=0.0)
        stats = [Stats(), Stats()]
        gens = [batch.steps(list(range(10 + 9 * i, 19 + 9 * i)), 8, SamplingConfig(), st) for i, st in enumerate(stats)]
        for g in gens:
            next(g)
        batch.step()  # two chains of 4 (+ 2 lookup nodes each): within the budget or not
        assert all((st.nodes > 1) == tree_steps for st in stats), (lookup, rows)
        for g in gens:
            g.close()


class _Spy:
    """A TorchEngine that records what the loop asks of it, and returns no hidden states when told "none"
    (as the Engine contract allows and the llama.cpp engine does)."""

    def __init__(self, engine):
        self.engine, self.capacity, self.need = engine, [], []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def new_cache(self, capacity):
        self.capacity.append(capacity)
        return self.engine.new_cache(capacity)

    def prefill(self, cache, ids, hidden):
        self.need.append(hidden)
        h, logits = self.engine.prefill(cache, ids, hidden)
        return (None if hidden == "none" else h), logits


def test_the_loop_sizes_its_cache_asks_only_for_the_hidden_states_it_needs_and_takes_the_calls_tree(monkeypatch):
    import itertools

    from tiny import tiny_heads, tiny_hydra_heads

    from draftheads.acceptance import SamplingConfig
    from draftheads.engine import TorchEngine
    from draftheads.generate import Decoder, Stats
    from draftheads.kvcache import TreeKVCache
    from draftheads.lookup import PromptLookup

    model, sp = tiny_model(), SamplingConfig()
    chain3, chain2 = load_tree("chain3"), load_tree("chain2")
    for heads, lookup, tree, need in ((None, None, None, "none"), (tiny_heads(model), None, chain3, "last"),
                                      (None, PromptLookup(), None, "none"),
                                      (tiny_hydra_heads(model, "hydra++"), None, chain3, "all")):
        spy = _Spy(TorchEngine(model))
        dec = Decoder(model, heads, tree, lookup, engine=spy)
        out = []
        for step in dec.steps(list(range(10, 20)), 5, sp, Stats()):
            out += step
            if len(out) >= 5:
                break
        reserve = dec.drafter.max_size(dec.tree) if dec.drafter is not None else 1
        assert spy.need == [need] and spy.capacity == [10 + 5 + reserve], (need, spy.capacity)
    dec = Decoder(model, tiny_heads(model), chain3)
    stats = Stats()
    next(dec.steps([7], 4, sp, stats, tree=chain2))  # a one-token prompt, and this call's own tree
    assert stats.tree_size == 3
    with pytest.raises(UserError, match="^the prompt is empty$"):
        next(dec.steps([], 4, sp, Stats()))
    with pytest.raises(UserError, match=f"^the prompt has {dec.context} tokens but the model's context is "
                                        f"{dec.context}$"):
        next(dec.steps([1] * dec.context, 4, sp, Stats()))
    next(dec.steps([1] * (dec.context - 1), 1, sp, Stats()))

    # To the end of the cache: a tree step while the tree fits, then plain steps, every token handed out.
    cache, stats, P = TreeKVCache.for_model(model, 20), Stats(), 10
    out, gen = [], dec.steps(list(range(40, 40 + P)), 100, sp, stats, cache=cache)
    out += next(gen)
    while True:
        L, nodes = cache.length, stats.nodes
        step = next(gen, None)
        if step is None:
            break
        out += step
        assert (stats.nodes - nodes > 1) == (L + 4 <= 20), (L, stats.nodes - nodes)
    assert cache.length == 20 and len(out) == 20 - P + 1

    clock = itertools.count(100)  # one tick per reading: prefill one tick, each phase of a step one tick
    monkeypatch.setattr(dec, "_sync", lambda: float(next(clock)))
    stats = Stats()
    gen = dec.steps(list(range(5, 12)), 8, sp, stats)
    next(gen), next(gen), next(gen)
    assert (stats.prefill_s, stats.draft_s, stats.verify_s, stats.accept_s) == (1.0, 2.0, 2.0, 2.0)
