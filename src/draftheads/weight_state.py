"""Whether modules' parameters changed since something was made from them that a pass reads instead.

The lean forward fuses q/k/v and gate/up into one tensor each, packs the products' weights into GGUF blocks
(few_rows.packed) and hands them to the C++ decoder stack, once. A parameter replaced (`module.weight = ...`,
`load_state_dict(assign=True)`, `model.to()`), re-pointed (`.data =`) or written in place (`load_state_dict`, an
adapter merged) must be seen before the next pass, or the pass computes with the old weights: a silent wrong answer.
Asking every parameter from Python took ~0.26 ms a pass on the default model (~4% of a one-row step); a C++ watch
over the parameters (few_rows.cpp's Watch) asks the same in ~7 us for the fused products' ~150 parameters and as
much for the stack's others, and the Python walk runs only where it saw a change (or where the C++ kernels do not
build).
"""

from __future__ import annotations

import torch

from . import few_rows


class WeightState:
    """`state()` gives a token for the parameters of `modules` (their `_parameters`, in order) and the plain tensor
    `attributes` (owner, name) (Hydra's shared LM-head rows, which no module registers): the same object again while
    none of them was replaced, added, removed, re-pointed, reshaped or written in place."""

    def __init__(self, modules: list[torch.nn.Module], attributes: list[tuple[object, str]] = ()):
        self.modules, self.attributes = modules, list(attributes)
        self._token: tuple | None = None
        self._watch = None

    def state(self) -> tuple:
        if self._watch is not None and self._watch.same():
            return self._token
        entries = [(m._parameters, name, t) for m in self.modules for name, t in m._parameters.items() if t is not None]
        # An attribute lives in its owner's __dict__ (a module keeps tensors that are no parameter or buffer there);
        # the watch's dict-size check then also fires on any attribute added to the owner: a needless recount only.
        entries += [(vars(owner), name, vars(owner)[name]) for owner, name in self.attributes]
        token = tuple((t.data_ptr(), few_rows._version(t), tuple(t.shape), t.stride()) for _, _, t in entries)
        if token != self._token:  # an equal token stays the same object: callers compare with `is`
            self._token = token
        module = few_rows.load()
        self._watch = module.Watch(entries) if module is not None else None
        return self._token
