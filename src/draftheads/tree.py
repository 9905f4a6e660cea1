"""A draft tree: a list of paths of ranks, Medusa's `medusa_choices` format.

`[a]` is the rank-a candidate of head 0 placed after the root (the backbone's own next token);
`[a, b]` is the rank-b candidate of head 1 placed after `[a]`; depth d uses head d-1. Node 0 is the
root and is not listed. Nodes are sorted by (depth, path), as Medusa does, so published trees load
unchanged. The tensors a step needs are built once per (tree, device) and cached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .errors import UserError

# Medusa's published 63-node tree for 7B models (`mc_sim_7b_63`, medusa/model/medusa_choices.py).
MEDUSA63 = [[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
            [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8],
            [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0],
            [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0],
            [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1],
            [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0]]

MAX_RANK = 10  # candidates drawn per head, as in Medusa (TOPK = 10)


@dataclass(frozen=True)
class TreeTensors:
    """Per-device tensors of a tree with N nodes (root included)."""

    tree_bias: torch.Tensor  # [N, N] additive attention bias: 0 where node j is i or an ancestor of i, else -inf
    depths: torch.Tensor  # [N] root 0
    head_of: torch.Tensor  # [N-1] head that drafts each non-root node (depth - 1)
    rank_of: torch.Tensor  # [N-1] rank of each non-root node's token in its head's top-k


@dataclass(frozen=True)
class Level:
    """The nodes at one depth d >= 1, for drafters that draft depth by depth (Hydra)."""

    nodes: torch.Tensor  # [n] node indices at depth d
    parent_paths: torch.Tensor  # [p, d] node indices from the root to each distinct parent (at depth d-1)
    parent_pos: torch.Tensor  # [n] row of each node's parent in parent_paths
    ranks: torch.Tensor  # [n] rank of each node's token among its parent's candidates
    topk: int  # candidates needed per parent at this depth


class Tree:
    def __init__(self, paths, max_rank: int = MAX_RANK):
        paths = [tuple(int(r) for r in p) for p in paths]
        seen = set(paths)
        if len(seen) != len(paths):
            raise UserError("tree lists a path twice")
        for p in paths:
            if not p:
                raise UserError("tree contains an empty path (the root is implicit)")
            if any(r < 0 or r >= max_rank for r in p):
                raise UserError(f"tree path {list(p)} uses a rank outside 0..{max_rank - 1} (candidates drawn per head)")
            if len(p) > 1 and p[:-1] not in seen:
                raise UserError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree")
        self.paths: list[tuple[int, ...]] = sorted(paths, key=lambda p: (len(p), p))
        self.index = {p: i + 1 for i, p in enumerate(self.paths)}  # path -> node index; root is 0
        self._tensors: dict[tuple, TreeTensors | list[Level]] = {}

    @property
    def size(self) -> int:
        """Number of nodes verified per step, root included."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def topk(self) -> int:
        return 1 + max((max(p) for p in self.paths), default=0)

    @cached_property
    def parent(self) -> list[int]:
        return [-1] + [self.index.get(p[:-1], 0) for p in self.paths]

    @cached_property
    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for node in range(1, self.size):
            kids[self.parent[node]].append(node)
        return kids

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        out = [node]
        while out[-1] != 0:
            out.append(self.parent[out[-1]])
        return out[::-1]

    def levels(self, device: torch.device | str) -> list[Level]:
        """Per depth 1..depth, the nodes and their parents' paths (built once per device)."""
        key = ("levels", str(device))
        if key not in self._tensors:
            levels = []
            for d in range(1, self.depth + 1):
                nodes = [i for i in range(1, self.size) if len(self.paths[i - 1]) == d]
                parents = sorted({self.parent[i] for i in nodes})
                pos = {p: j for j, p in enumerate(parents)}
                levels.append(Level(
                    nodes=torch.tensor(nodes, device=device),
                    parent_paths=torch.tensor([self.path_to(p) for p in parents], device=device).view(len(parents), d),
                    parent_pos=torch.tensor([pos[self.parent[i]] for i in nodes], device=device),
                    ranks=torch.tensor([self.paths[i - 1][-1] for i in nodes], device=device),
                    topk=1 + max(self.paths[i - 1][-1] for i in nodes)))
            self._tensors[key] = levels
        return self._tensors[key]

    def check_heads(self, num_heads: int) -> None:
        if self.depth > num_heads:
            deepest = max(self.paths, key=len)
            raise UserError(f"tree path {list(deepest)} has depth {len(deepest)} but the heads have only {num_heads}")

    def tensors(self, device: torch.device | str, dtype: torch.dtype) -> TreeTensors:
        key = (str(device), dtype)
        if key not in self._tensors:
            n = self.size
            allowed = torch.eye(n, dtype=torch.bool)
            allowed[:, 0] = True
            for node in range(1, n):
                allowed[node] |= allowed[self.parent[node]]
            bias = torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            depths = torch.tensor([0] + [len(p) for p in self.paths])
            self._tensors[key] = TreeTensors(
                tree_bias=bias.to(device), depths=depths.to(device),
                head_of=(depths[1:] - 1).to(device), rank_of=torch.tensor([p[-1] for p in self.paths], dtype=torch.long).to(device))
        return self._tensors[key]

    def to_json(self) -> list[list[int]]:
        return [list(p) for p in self.paths]

    def __repr__(self):
        return f"Tree({self.size} nodes, depth {self.depth})"


def chain(depth: int) -> Tree:
    """The top-1 chain of the given depth (no branching)."""
    return Tree([[0] * d for d in range(1, depth + 1)])


def truncate(paths, max_depth: int) -> list[list[int]]:
    return [list(p) for p in paths if len(p) <= max_depth]


def load_tree(spec, num_heads: int | None = None) -> Tree:
    """A tree from a name (`medusa63`, `medusaN`, `chainN`), a JSON file (a list of paths, or {"tree": [...]}),
    or a list of paths. Named published trees are truncated to the number of heads."""
    if isinstance(spec, Tree):
        tree = spec
    elif isinstance(spec, (list, tuple)):
        tree = Tree(spec)
    elif isinstance(spec, str) and spec.startswith("medusa") and spec[6:].isdigit() and 1 <= int(spec[6:]) <= 63:
        # The first N paths of mc_sim_7b_63 (listed most-probable first, every prefix is a valid tree),
        # truncated to the heads' depth.
        tree = Tree(truncate(MEDUSA63[: int(spec[6:])], num_heads or 4))
    elif isinstance(spec, str) and spec.startswith("chain") and spec[5:].isdigit():
        tree = chain(int(spec[5:]))
    else:
        path = Path(str(spec))
        if not path.exists():
            raise UserError(f"tree file not found: {spec} (or name a tree: medusa63, medusa<N> for its first N paths, chain<N>)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"tree file {spec} is not valid JSON: {e}") from None
        if isinstance(data, dict):
            data = data.get("tree")
        if not isinstance(data, list) or not all(isinstance(p, list) and all(isinstance(r, int) for r in p) for p in data):
            raise UserError(f"tree file {spec} must hold a list of paths of ranks, e.g. [[0], [1], [0, 0]]")
        tree = Tree(data)
    if num_heads is not None:
        tree.check_heads(num_heads)
    return tree
