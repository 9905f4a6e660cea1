"""weight_state.WeightState: the token stays the same object while the modules' parameters are unchanged, and
changes with every way a parameter can change under a derived copy (fused, packed, held by the C++ stack): with
the C++ watch and with the Python walk alone (where the kernels do not build)."""

import pytest
import torch

from draftheads import few_rows
from draftheads.weight_state import WeightState


def _swap(m):
    torch.utils.swap_tensors(m.weight, torch.nn.Parameter(torch.ones(4, 8)))


def _replace_in_dict(m):
    m._parameters["weight"] = torch.nn.Parameter(m.weight.detach().clone())  # no registration: a direct write


def _add(m):
    m.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))


def _remove_bias(m):
    del m.bias
    m.bias = None


CHANGES = {
    "written in place": lambda m: m.weight.mul_(2),
    "written through state_dict": lambda m: m.state_dict()["weight"].add_(1),
    "bias written": lambda m: m.bias.add_(1),
    "re-pointed with .data": lambda m: setattr(m.weight, "data", m.weight.data.clone()),
    "same storage, transposed": lambda m: setattr(m.weight, "data", m.weight.data.view(8, 4).t()),
    "replaced by setattr": lambda m: setattr(m, "weight", torch.nn.Parameter(m.weight.detach().clone())),
    "replaced in _parameters": _replace_in_dict,
    "swapped (swap_tensors)": _swap,
    "a parameter added": _add,
    "the bias removed": _remove_bias,
}


@pytest.fixture(params=["watch", "walk"])
def watching(request, monkeypatch):
    if request.param == "walk":
        monkeypatch.setattr(few_rows, "load", lambda: None)
    elif few_rows.load() is None:
        pytest.skip("the C++ kernels do not build here")
    return request.param


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_gives_a_new_token_and_none_keeps_it(change, watching):
    with torch.no_grad():
        modules = [torch.nn.Linear(8, 4), torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)]
        state = WeightState(modules)
        first = state.state()
        assert state.state() is first and state.state() is first  # nothing changed: the same object
        modules[2].weight.sum()  # reads change nothing
        assert state.state() is first
        CHANGES[change](modules[1])
        second = state.state()
        assert second is not first
        assert state.state() is second  # and it holds still again


def test_a_parameter_of_inference_mode_keeps_no_version_but_its_replacement_shows():
    """Inference tensors keep no version counter (an in-place write in inference mode goes unseen: why the lean
    forward fuses out of it); a replaced or re-pointed one still shows."""
    with torch.inference_mode():
        m = torch.nn.Linear(8, 4)
    state = WeightState([m])
    first = state.state()
    m.weight = torch.nn.Parameter(torch.zeros(4, 8))
    assert state.state() is not first


ATTRIBUTE_CHANGES = {
    "written in place": lambda h: h.rows.mul_(2),
    "replaced": lambda h: setattr(h, "rows", h.rows.clone()),
    "re-pointed with .data": lambda h: setattr(h.rows, "data", h.rows.data.clone()),
    "reshaped": lambda h: setattr(h, "rows", h.rows.view(2, 8)),
}


@pytest.mark.parametrize("change", list(ATTRIBUTE_CHANGES))
def test_a_plain_tensor_attribute_is_watched_as_a_parameter_is(change, watching):
    holder = torch.nn.Module()
    holder.rows = torch.randn(4, 4)  # no parameter, no buffer: the module keeps it in its __dict__
    state = WeightState([torch.nn.Linear(4, 4)], [(holder, "rows")])
    first = state.state()
    assert state.state() is first
    ATTRIBUTE_CHANGES[change](holder)
    second = state.state()
    assert second is not first and state.state() is second
