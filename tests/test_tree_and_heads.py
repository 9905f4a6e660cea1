"""Trees (tensors, validation) and heads on disk (native, official Medusa, wrong backbone)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from draftheads.errors import UserError
from draftheads.heads import load_heads, save_heads
from draftheads.tree import MEDUSA63, Tree, load_tree
from tiny import tiny_heads, tiny_model


def test_tree_tensors_match_medusa_worked_example():
    # medusa_digest.md §2.3: choices [[0],[1],[0,0],[0,1],[1,0],[0,0,0]]
    tree = Tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    tt = tree.tensors("cpu", torch.float32)
    assert tt.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    visible = (tt.tree_bias == 0).int().tolist()
    assert visible == [[1, 0, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0, 0],
                       [1, 0, 1, 0, 0, 0, 0],
                       [1, 1, 0, 1, 0, 0, 0],
                       [1, 1, 0, 0, 1, 0, 0],
                       [1, 0, 1, 0, 0, 1, 0],
                       [1, 1, 0, 1, 0, 0, 1]]
    assert tt.head_of.tolist() == [0, 0, 1, 1, 1, 2] and tt.rank_of.tolist() == [0, 1, 0, 1, 0, 0]
    assert tree.children[0] == [1, 2] and tree.parent[6] == 3


def test_medusa63_loads_and_truncates_to_the_heads():
    assert load_tree("medusa63", 4).size == 64
    assert load_tree("medusa63", 3).depth == 3
    assert load_tree("medusa63", 3).size == 1 + sum(len(p) <= 3 for p in MEDUSA63)


@pytest.mark.parametrize("paths,message", [
    ([[0], [1, 0]], "has no parent [1]"),
    ([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], "depth 4 but the heads have only 3"),
    ([[12]], "rank outside"),
    ([[0], [0]], "twice"),
    ([[]], "empty path"),
])
def test_invalid_trees_are_named(paths, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_tree(paths, num_heads=3)


def test_tree_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tree(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tree(str(bad))
    bad.write_text('{"tree": "x"}')
    with pytest.raises(UserError, match="list of paths"):
        load_tree(str(bad))
    good = tmp_path / "tree.json"
    good.write_text(json.dumps({"tree": [[0], [0, 0]]}))
    assert load_tree(str(good)).size == 3


def _same_drafts(a, b, model):
    hidden = torch.randn(model.config.hidden_size)
    tree = load_tree("medusa16", 3)
    da = a.draft(hidden, torch.tensor(5), tree)
    db = b.draft(hidden, torch.tensor(5), tree)
    assert torch.equal(da, db)


def test_native_heads_round_trip(tmp_path):
    model = tiny_model()
    heads = tiny_heads(model)
    save_heads(heads, tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["config.json", "model.safetensors"]
    _same_drafts(heads, load_heads(tmp_path / "h", model), model)


def test_heads_refuse_another_backbone(tmp_path):
    model = tiny_model(seed=0)
    save_heads(tiny_heads(model), tmp_path / "h")
    with pytest.raises(UserError, match="trained for backbone"):
        load_heads(tmp_path / "h", tiny_model(seed=1))
    with pytest.raises(UserError, match="hidden size"):
        load_heads(tmp_path / "h", tiny_model(hidden=32))


def test_heads_directory_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_heads(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_heads(tmp_path / "empty")
    model = tiny_model()
    save_heads(tiny_heads(model), tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    (tmp_path / "h" / "config.json").write_text(json.dumps({**cfg, "colour": "red"}))
    with pytest.raises(UserError, match="unknown keys in heads config: colour"):
        load_heads(tmp_path / "h")
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "h" / "model.safetensors").write_bytes(b"torn")
    with pytest.raises(UserError, match="cannot read"):
        load_heads(tmp_path / "h")


def _official_state(heads):
    state = {}
    for h, block in enumerate(heads.blocks):
        state[f"{h}.0.linear.weight"] = block[0].linear.weight.detach().clone()
        state[f"{h}.0.linear.bias"] = block[0].linear.bias.detach().clone()
        if heads.lm_heads is not None:
            state[f"{h}.1.weight"] = heads.lm_heads[h].weight.detach().clone()
    return state


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_official_medusa_layout_loads_without_pickle(tmp_path, fmt):
    model = tiny_model()
    heads = tiny_heads(model)
    # The official v0.1 config under-reports its heads (2 here, 3 in the file): the weights win.
    (tmp_path / "config.json").write_text(json.dumps({"base_model_name_or_path": "tiny", "medusa_num_heads": 2,
                                                      "medusa_num_layers": 1}))
    state = _official_state(heads)
    if fmt == "pt":
        torch.save(state, tmp_path / "medusa_lm_head.pt")
    else:
        save_file(state, tmp_path / "medusa_lm_head.safetensors")
    loaded = load_heads(tmp_path, model)
    assert loaded.cfg.num_heads == 3
    _same_drafts(heads, loaded, model)


@pytest.mark.parametrize("drop", ["0.0.linear.weight", "all"])
def test_official_layout_with_a_missing_key_is_a_clear_error(tmp_path, drop):
    state = _official_state(tiny_heads(tiny_model()))
    state = {} if drop == "all" else {k: v for k, v in state.items() if k != drop}
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 1}))
    save_file(state or {"other": torch.zeros(1)}, tmp_path / "medusa_lm_head.safetensors")
    with pytest.raises(UserError, match="does not have the official Medusa layout"):
        load_heads(tmp_path)


def test_official_pickle_with_code_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 1, "medusa_num_layers": 1}))
    torch.save({"0.0.linear.weight": torch.zeros(2, 2), "evil": print}, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(UserError, match="safely"):
        load_heads(tmp_path)


def test_shipped_heads_names_resolve_or_say_none_is_shipped(monkeypatch, tmp_path):
    from draftheads import draftmodel

    monkeypatch.setitem(draftmodel.SHIPPED_HEADS, "hydra", tmp_path / "absent")
    with pytest.raises(UserError, match=r"^no 'hydra' heads are shipped in this version: pass heads=<directory>"):
        draftmodel.heads_dir("hydra")
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "config.json").write_text("{}")
    assert draftmodel.heads_dir("hydra") == tmp_path / "absent"
