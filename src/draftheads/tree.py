"""A draft tree: a list of paths of ranks, Medusa's `medusa_choices` format.

`[a]` is the rank-a candidate of head 0 placed after the root (the backbone's own next token);
`[a, b]` is the rank-b candidate of head 1 placed after `[a]`; depth d uses head d-1. Node 0 is the
root and is not listed. Nodes are sorted by (depth, path), as Medusa does, so published trees load
unchanged. The tensors a step needs are built once per (tree, device) and cached.

Given nodes: a drafter that knows tokens rather than ranks (prompt lookup) adds nodes whose token it
gives. Their paths continue a ranked path (or the root) with negative elements: -1 - j is the j-th
given child of its parent, so `(0, -1, -1)` is a chain of two given tokens below the rank-0 node.
They come after every ranked node, so the ranked nodes keep their Medusa indices and the heads draft
the ranked part (`Tree(paths)`) alone. `tree.with_given(paths)` builds such a tree once per shape.
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
MAX_SHAPES = 4096  # trees with given nodes kept per ranked tree (a few hundred shapes occur in practice)


@dataclass(frozen=True)
class TreeTensors:
    """Per-device tensors of a tree with N nodes (root included)."""

    tree_bias: torch.Tensor  # [N, N] additive attention bias: 0 where node j is i or an ancestor of i, else -inf
    depths: torch.Tensor  # [N] root 0
    head_of: torch.Tensor  # head that drafts each non-root ranked node (depth - 1); R = ranked nodes
    rank_of: torch.Tensor  # rank of each non-root ranked node's token in its head's top-k


@dataclass(frozen=True)
class Level:
    """The nodes at one depth d >= 1, for drafters that draft depth by depth (Hydra)."""

    nodes: torch.Tensor  # [n] node indices at depth d
    parent_paths: torch.Tensor  # [p, d] node indices from the root to each distinct parent (at depth d-1)
    parent_pos: torch.Tensor  # [n] row of each node's parent in parent_paths
    ranks: torch.Tensor  # [n] rank of each node's token among its parent's candidates
    topk: int  # candidates needed per parent at this depth


class Tree:
    def __init__(self, paths, max_rank: int = MAX_RANK, given=()):
        """paths: ranked paths (Medusa's format); given: paths of given nodes (module docstring)."""
        paths = [tuple(int(r) for r in p) for p in paths]
        given = [tuple(int(r) for r in p) for p in given]
        seen = set(paths) | set(given)
        if len(seen) != len(paths) + len(given):
            raise UserError("tree lists a path twice")
        for i, p in enumerate(paths + given):
            if not p:
                raise UserError("tree contains an empty path (the root is implicit)")
            # a ranked path is all ranks; a given path is ranks, then one or more given (negative) elements
            ranks = p if i < len(paths) else p[:next((j for j, r in enumerate(p) if r < 0), len(p))]
            if any(r < 0 or r >= max_rank for r in ranks):
                raise UserError(f"tree path {list(p)} uses a rank outside 0..{max_rank - 1} (candidates drawn per head)")
            if i >= len(paths) and (len(ranks) == len(p) or any(r >= 0 for r in p[len(ranks):])):
                raise UserError(f"given path {list(p)} must be ranks followed by given (negative) elements only")
            if len(p) > 1 and p[:-1] not in seen:
                raise UserError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree")
        key = lambda p: (len(p), p)  # noqa: E731
        self.max_rank = max_rank
        self.ranked_size = len(paths) + 1  # nodes 0..ranked_size-1 are the root and the ranked nodes
        self.paths: list[tuple[int, ...]] = sorted(paths, key=key) + sorted(given, key=key)
        self.index = {p: i + 1 for i, p in enumerate(self.paths)}  # path -> node index; root is 0
        self._tensors: dict[tuple, TreeTensors | list[Level]] = {}
        self._shapes: dict[tuple, Tree] = {}  # with_given's trees, by their given paths, and cut's

    @property
    def size(self) -> int:
        """Number of nodes verified per step, root included."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def topk(self) -> int:
        return 1 + max((max(p) for p in self.paths[:self.ranked_size - 1]), default=0)

    @cached_property
    def given(self) -> list[bool]:
        """Per node: its token is given (prompt lookup) rather than a head's ranked candidate."""
        return [False] * self.ranked_size + [True] * (self.size - self.ranked_size)

    @cached_property
    def ranked(self) -> "Tree":
        """The ranked nodes alone: the tree the heads draft (self when there are no given nodes)."""
        return self if self.ranked_size == self.size else Tree(self.paths[:self.ranked_size - 1], self.max_rank)

    def with_given(self, given) -> "Tree":
        """This (ranked) tree plus given nodes, built once per shape: the same shape again returns the same
        Tree, whose tensors are already built. No given paths: this tree itself."""
        assert self.ranked_size == self.size, "given nodes hang on a ranked tree"
        key = tuple(sorted(tuple(p) for p in given))
        if not key:
            return self
        return self._shape(key, lambda: Tree(self.paths, self.max_rank, key))

    def cut(self, keep: tuple[bool, ...]) -> "Tree":
        """The nodes with keep[node] true (the root and every kept node's parent among them), in their
        order, built once per shape: what a drafter verifies of this ranked tree when it trusts only some
        of its candidates. Keeping every node returns this tree itself."""
        assert self.ranked_size == self.size and len(keep) == self.size and keep[0]
        if all(keep):
            return self

        def build() -> Tree:
            assert all(keep[self.parent[i]] for i in range(1, self.size) if keep[i]), "a kept node's parent was cut"
            return Tree([p for p, k in zip(self.paths, keep[1:]) if k], self.max_rank)

        return self._shape(("cut",) + tuple(keep), build)

    def _shape(self, key: tuple, build) -> "Tree":
        """The tree `build()` makes, made once per key: with_given's and cut's shapes recur every few steps
        and keep their built tensors (at most MAX_SHAPES kept)."""
        tree = self._shapes.get(key)
        if tree is None:
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()
            tree = self._shapes[key] = build()
        return tree

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
        """Per depth 1..depth, the ranked nodes and their parents' paths (built once per device)."""
        key = ("levels", str(device))
        if key not in self._tensors:
            levels = []
            for d in range(1, self.ranked.depth + 1):
                nodes = [i for i in range(1, self.ranked_size) if len(self.paths[i - 1]) == d]
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
            ranked = self.paths[:self.ranked_size - 1]
            self._tensors[key] = TreeTensors(
                tree_bias=bias.to(device), depths=depths.to(device), head_of=(depths[1:self.ranked_size] - 1).to(device),
                rank_of=torch.tensor([p[-1] for p in ranked], dtype=torch.long).to(device))
        return self._tensors[key]

    def to_json(self) -> list[list[int]]:
        return [list(p) for p in self.paths]

    def __repr__(self):
        given = f", {self.size - self.ranked_size} given" if self.size > self.ranked_size else ""
        return f"Tree({self.size} nodes{given}, depth {self.depth})"


def chain(depth: int) -> Tree:
    """The top-1 chain of the given depth (no branching)."""
    return Tree([[0] * d for d in range(1, depth + 1)])


def truncate(paths, max_depth: int) -> list[list[int]]:
    return [list(p) for p in paths if len(p) <= max_depth]


def _paths_of_ranks(data) -> bool:
    """Whether data is a list of lists of integer ranks (True and False are not ranks, though Python counts them)."""
    return isinstance(data, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and all(isinstance(r, int) and not isinstance(r, bool) for r in p) for p in data)


def load_tree(spec, num_heads: int | None = None) -> Tree:
    """A tree from a name (`medusa63`, `medusaN`, `chainN`), a JSON file (a list of paths, or {"tree": [...]}),
    or a list of paths. Named published trees are truncated to the number of heads."""
    if isinstance(spec, Tree):
        tree = spec
    elif isinstance(spec, (list, tuple)):
        if not _paths_of_ranks(spec):
            raise UserError(f"a tree must be a list of paths of ranks, e.g. [[0], [1], [0, 0]], not {spec!r}")
        tree = Tree(spec)
    elif isinstance(spec, str) and spec.startswith("medusa") and spec[6:].isdigit() and 1 <= int(spec[6:]) <= 63:
        # The first N paths of mc_sim_7b_63 (listed most-probable first, every prefix is a valid tree),
        # truncated to the heads' depth.
        tree = Tree(truncate(MEDUSA63[: int(spec[6:])], num_heads or 4))
    elif isinstance(spec, str) and spec.startswith("chain") and spec[5:].isdigit() and int(spec[5:]) >= 1:
        tree = chain(int(spec[5:]))
    else:
        path = Path(str(spec))
        if not path.exists():
            raise UserError(f"tree file not found: {spec} (or name a tree: medusa63, medusa<N> for its first N paths "
                            f"with N in 1..63, chain<N> with N >= 1)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"tree file {spec} is not valid JSON: {e}") from None
        except OSError as e:  # a directory, no permission
            raise UserError(f"cannot read tree file {spec}: {e.strerror}") from None
        if isinstance(data, dict):
            data = data.get("tree")
        if not _paths_of_ranks(data):
            raise UserError(f"tree file {spec} must hold a list of paths of ranks, e.g. [[0], [1], [0, 0]]")
        tree = Tree(data)
    if num_heads is not None:
        tree.check_heads(num_heads)
    return tree
