"""Export to vLLM / Medusa / TGI layouts and import back: same logits, same drafts."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftheads.errors import UserError
from draftheads.heads import HeadsConfig, MedusaHeads, load_heads, save_heads
from draftheads.heads.export import check_exportable, export_heads
from draftheads.tree import load_tree
from tiny import tiny_heads, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _heads(model, lm_head="own", trimmed=None, layers=1, seed=3):
    torch.manual_seed(seed)
    cfg = HeadsConfig(num_heads=3, hidden_size=64, vocab_size=model.config.vocab_size, num_layers=layers,
                      lm_head=lm_head, trimmed_vocab=trimmed, backbone="tiny",
                      backbone_fingerprint=tiny_heads(model).cfg.backbone_fingerprint, tree=[[0], [0, 0]],
                      lookup=True, heads_alone={"tree": [[0], [1], [0, 0]], "draft_confidence": 0.2})
    heads = MedusaHeads(cfg)
    if trimmed:
        heads.vocab_map.copy_(torch.randperm(cfg.vocab_size)[:trimmed])
    heads.init_lm_heads_from(model)
    for p in heads.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return heads.attach(model).eval()


def _same(a: MedusaHeads, b: MedusaHeads):
    hidden = torch.randn(5, 64)
    torch.testing.assert_close(a(hidden), b(hidden), rtol=0, atol=0)
    tree = load_tree("medusa16", 3)
    for i in range(5):
        da = a.draft(hidden[i], torch.tensor(7), tree)
        db = b.draft(hidden[i], torch.tensor(7), tree)
        assert da.tolist() == db.tolist()
    assert (a.cfg.num_heads, a.cfg.num_layers, a.cfg.lm_head, a.cfg.trimmed_vocab, a.cfg.vocab_size) == \
           (b.cfg.num_heads, b.cfg.num_layers, b.cfg.lm_head, b.cfg.trimmed_vocab, b.cfg.vocab_size)
    assert b.cfg.backbone_fingerprint == a.cfg.backbone_fingerprint and b.cfg.tree == a.cfg.tree
    assert (b.cfg.lookup, b.cfg.heads_alone) == (a.cfg.lookup, a.cfg.heads_alone)  # what load picks a tree by


@pytest.mark.parametrize("to", ["vllm", "medusa", "tgi"])
@pytest.mark.parametrize("lm_head,layers", [("own", 1), ("own", 2), ("shared", 1)])
def test_round_trip(model, tmp_path, to, lm_head, layers):
    heads = _heads(model, lm_head, layers=layers)
    export_heads(heads, tmp_path, to, backbone_weight=model.get_output_embeddings().weight)
    back = load_heads(tmp_path, model)
    _same(heads, back)


def test_an_export_whose_calibration_is_malformed_is_refused_in_one_line(model, tmp_path):
    export_heads(_heads(model), tmp_path, "vllm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["draftheads"]["heads_alone"] = {"tree": [[0]], "draft_confidence": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="heads_alone must be"):
        load_heads(tmp_path, model)


def test_vllm_layout_names(model, tmp_path):
    export_heads(_heads(model, layers=2), tmp_path, "vllm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "medusa" and cfg["num_heads"] == 3 and cfg["num_hidden_layers"] == 2
    assert cfg["medusa_fc_bias"] is True and cfg["original_lm_head"] is False
    assert cfg["truncated_vocab_size"] == cfg["vocab_size"] == model.config.vocab_size
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert keys == {f"blocks.{h}.layers.{l}.{p}" for h in range(3) for l in range(2) for p in ("weight", "bias")} | \
        {f"lm_heads.{h}.weight" for h in range(3)}


def test_vocabtrim_goes_to_vllm_only(model, tmp_path):
    for lm_head in ("own", "shared"):
        heads = _heads(model, lm_head, trimmed=100)
        export_heads(heads, tmp_path / lm_head, "vllm", backbone_weight=model.get_output_embeddings().weight)
        assert json.loads((tmp_path / lm_head / "config.json").read_text())["truncated_vocab_size"] == 100
        assert load_file(tmp_path / lm_head / "model.safetensors")["token_map"].tolist() == heads.vocab_map.tolist()
        _same(heads, load_heads(tmp_path / lm_head, model))
    for to in ("medusa", "tgi"):
        with pytest.raises(UserError, match="VocabTrim"):
            export_heads(_heads(model, trimmed=100), tmp_path / to, to)


def test_refusals(model, tmp_path):
    with pytest.raises(UserError, match="need the backbone"):
        export_heads(_heads(model, "shared"), tmp_path / "a", "vllm")
    with pytest.raises(UserError, match="one layer"):
        export_heads(_heads(model, "shared", layers=2), tmp_path / "b", "tgi")
    (tmp_path / "hydra").mkdir()
    (tmp_path / "hydra" / "config.json").write_text(json.dumps({"head_type": "hydra", "num_heads": 3}))
    with pytest.raises(UserError, match="no serving-engine support"):
        check_exportable(tmp_path / "hydra")


def test_exported_heads_refuse_another_backbone(tmp_path):
    model = tiny_model()
    export_heads(_heads(model), tmp_path, "vllm")
    with pytest.raises(UserError, match="trained for backbone"):
        load_heads(tmp_path, tiny_model(seed=5))


def test_foreign_vllm_checkpoint_without_bias(model, tmp_path):
    """A vLLM checkpoint written elsewhere: no bias (vLLM's default), medusa_num_heads-style names."""
    heads = _heads(model)
    tensors = {f"blocks.{h}.layers.0.weight": heads.blocks[h][0].linear.weight.detach().clone() for h in range(3)}
    tensors.update({f"medusa_heads.lm_heads.{h}.weight": heads.lm_heads[h].weight.detach().clone() for h in range(3)})
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "medusa", "medusa_num_heads": 3, "medusa_num_layers": 1,
                                                      "hidden_size": 64, "vocab_size": model.config.vocab_size}))
    back = load_heads(tmp_path, model)
    for h in range(3):
        heads.blocks[h][0].linear.bias.data.zero_()
    x = torch.randn(4, 64)
    torch.testing.assert_close(heads(x), back(x), rtol=0, atol=0)


def test_native_still_loads(model, tmp_path):
    heads = _heads(model)
    save_heads(heads, tmp_path)
    _same(heads, load_heads(tmp_path, model))


def test_cli_export(model, tmp_path):
    from draftheads.cli import main

    heads = _heads(model)
    save_heads(heads, tmp_path / "native")
    assert main(["export", "--heads", str(tmp_path / "native"), "--to", "tgi", "--out", str(tmp_path / "tgi")]) == 0
    assert main(["export", "--heads", str(tmp_path / "tgi"), "--to", "vllm", "--out", str(tmp_path / "vllm")]) == 0
    _same(heads, load_heads(tmp_path / "vllm", model))
    (tmp_path / "hydra").mkdir()
    (tmp_path / "hydra" / "config.json").write_text(json.dumps({"head_type": "hydra"}))
    assert main(["export", "--heads", str(tmp_path / "hydra"), "--to", "vllm", "--out", str(tmp_path / "x")]) == 2
    # Never over heads: neither the source itself nor an earlier export (both kept byte for byte)
    before = {p: p.read_bytes() for d in ("native", "vllm") for p in (tmp_path / d).iterdir()}
    for out in ("native", "vllm"):
        assert main(["export", "--heads", str(tmp_path / "native"), "--to", "vllm", "--out", str(tmp_path / out)]) == 2
    assert {p: p.read_bytes() for d in ("native", "vllm") for p in (tmp_path / d).iterdir()} == before


def test_cli_export_default_heads(tmp_path, capsys):
    from draftheads.cli import main
    from draftheads.draftmodel import DEFAULT_HEADS_DIR

    if not (DEFAULT_HEADS_DIR / "config.json").exists():
        pytest.skip("this version ships no default heads")
    assert main(["export", "--heads", "default", "--to", "vllm", "--out", str(tmp_path / "vllm")]) == 0
    assert load_heads(tmp_path / "vllm").cfg.num_heads == load_heads(DEFAULT_HEADS_DIR).cfg.num_heads
    # The shipped heads are VocabTrim heads: the medusa layout refuses them in one line, not "no config.json".
    assert main(["export", "--heads", "default", "--to", "medusa", "--out", str(tmp_path / "m")]) == 2
    assert "VocabTrim" in capsys.readouterr().err


def test_written_files_get_the_normal_mode(model, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        heads = _heads(model)
        save_heads(heads, tmp_path / "native")
        export_heads(heads, tmp_path / "vllm", "vllm")
    finally:
        os.umask(old)
    for d in ("native", "vllm"):
        for f in ("config.json", "model.safetensors"):
            assert stat.S_IMODE((tmp_path / d / f).stat().st_mode) == 0o644, (d, f)
