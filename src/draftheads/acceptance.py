"""Acceptance rules: pure functions of the verify logits and the tree's candidate tokens.

Each returns (accepted nodes, next token): the nodes are tree indices from the root down one path
(the root is always accepted: it is the backbone's own token from the previous step), and the next
token is the backbone's own choice after the last accepted node, which becomes the next root.

- greedy: follow the child equal to the argmax. Output is identical to plain greedy decoding.
- exact: sample x from the backbone's (temperature/top-k/top-p) distribution at the node; follow
  the child whose token is x, else emit x. Because the drafts are deterministic (top-k of each head),
  this is rejection sampling over the siblings with point-mass proposals: each sibling c is accepted
  with probability p(c) of the residual, and the output is distributed exactly as the backbone's own
  sampling.
- typical: Medusa's rule. A child is accepted if p(child) > min(epsilon, delta * exp(-H(p))); the most
  probable such child is followed. Faster at high temperature but NOT distribution-preserving.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch

from .errors import UserError
from .tree import Tree

RULES = ("greedy", "typical", "exact")
# A temperature below this is greedy in effect (a token 0.001 below the top logit gets p < e^-100), and
# dividing the logits by a far smaller one (1e-45, a subnormal) overflows to inf: served as greedy.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    acceptance: str = "greedy"
    typical_epsilon: float = 0.09
    typical_delta: float = 0.3
    seed: int | None = None

    def __post_init__(self):
        for name, kind in (("temperature", Real), ("top_p", Real), ("typical_epsilon", Real), ("typical_delta", Real),
                           ("top_k", Integral), ("seed", Integral)):
            value = getattr(self, name)
            if not (isinstance(value, kind) and not isinstance(value, bool)) and not (name == "seed" and value is None):
                raise UserError(f"{name} must be {'an integer' if kind is Integral else 'a number'}, not {value!r}")
        if self.seed is not None and not -2**63 <= self.seed < 2**64:  # torch.manual_seed's range
            raise UserError(f"seed must be in [-2**63, 2**64), not {self.seed}")
        if not (self.typical_epsilon > 0 and self.typical_delta > 0):
            raise UserError("typical_epsilon and typical_delta must be above 0")
        if 0 < self.temperature < GREEDY_BELOW:
            self.temperature = 0.0  # logits / 1e-45 overflow to inf; this close to 0 sampling is greedy anyway
        if self.acceptance not in RULES:
            raise UserError(f"unknown acceptance rule {self.acceptance!r}; choose one of {', '.join(RULES)}")
        if not (0 <= self.temperature < float("inf")) or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
        if self.temperature == 0:
            self.acceptance = "greedy"  # every rule is greedy at temperature 0
        elif self.acceptance == "greedy":
            raise UserError("acceptance 'greedy' needs temperature 0; use 'exact' or 'typical' to sample")


def sampling_probs(logits: torch.Tensor, sp: SamplingConfig) -> torch.Tensor:
    """logits [..., vocab] -> probabilities [..., vocab] after temperature, then top-k, then top-p,
    in the order and with the semantics of transformers' own sampling warpers."""
    logits = logits.float() / sp.temperature
    if sp.top_k:
        kth = logits.topk(min(sp.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - sp.top_p
        drop_sorted[..., -1] = False  # always keep the most probable token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.softmax(-1)


_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64)


def greedy_tokens(logits: torch.Tensor) -> list[int] | int:
    """The argmax of logits [..., vocab] over its last dim, the first of equal maxima (as torch.argmax): a list
    for [n, vocab], an int for [vocab]. On a CPU through numpy: torch's argmax took 74 us a row of the default
    model's 49,152 logits on this Xeon, numpy's 4.4 (eight sequences' rows were 4% of a batched pass)."""
    if logits.is_cpu and logits.dtype in _NUMPY_DTYPES:
        return np.argmax(logits.detach().numpy(), -1).tolist()
    return logits.argmax(-1).tolist()


def sample(logits: torch.Tensor, sp: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token from logits [vocab]: argmax at temperature 0, else a sample of sampling_probs."""
    if sp.temperature == 0:
        return int(greedy_tokens(logits))
    return int(torch.multinomial(sampling_probs(logits, sp), 1, generator=generator))


def _walk(tree: Tree, candidates: list[int], choose) -> tuple[list[int], int]:
    """Descend from the root: `choose(node)` gives the backbone's token after `node`; follow the child
    holding that token, or stop and return it as the next token."""
    node, nodes = 0, [0]
    while True:
        token = choose(node)
        child = next((c for c in tree.children[node] if candidates[c] == token), None)
        if child is None:
            return nodes, token
        nodes.append(child)
        node = child


def accept_greedy(logits: torch.Tensor, candidates: torch.Tensor, tree: Tree) -> tuple[list[int], int]:
    """logits [nodes, vocab], candidates [nodes]."""
    assert logits.shape[0] == candidates.shape[0] == tree.size
    best = greedy_tokens(logits)
    return _walk(tree, candidates.tolist(), best.__getitem__)


def accept_exact(logits: torch.Tensor, candidates: torch.Tensor, tree: Tree, sp: SamplingConfig,
                 generator: torch.Generator | None) -> tuple[list[int], int]:
    assert logits.shape[0] == candidates.shape[0] == tree.size
    return _walk(tree, candidates.tolist(), lambda node: sample(logits[node], sp, generator))


def accept_typical(logits: torch.Tensor, candidates: torch.Tensor, tree: Tree, sp: SamplingConfig,
                   generator: torch.Generator | None) -> tuple[list[int], int]:
    assert logits.shape[0] == candidates.shape[0] == tree.size
    cand = candidates.tolist()

    def choose(node: int) -> int:
        kids = tree.children[node]
        if kids:
            p = (logits[node].float() / sp.temperature).softmax(-1)
            entropy = -(p * (p + 1e-5).log()).sum()
            threshold = min(sp.typical_epsilon, sp.typical_delta * float(torch.exp(-entropy)))
            probs = p[[cand[c] for c in kids]].tolist()
            best = max(range(len(kids)), key=probs.__getitem__)
            if probs[best] > threshold:
                return cand[kids[best]]
        return sample(logits[node], sp, generator)

    return _walk(tree, cand, choose)


def accept(logits: torch.Tensor, candidates: torch.Tensor, tree: Tree, sp: SamplingConfig,
           generator: torch.Generator | None) -> tuple[list[int], int]:
    if sp.acceptance == "greedy":
        return accept_greedy(logits, candidates, tree)
    if sp.acceptance == "exact":
        return accept_exact(logits, candidates, tree, sp, generator)
    return accept_typical(logits, candidates, tree, sp, generator)
