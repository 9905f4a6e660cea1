"""Choosing a tree from measured head accuracies and measured step latency. Pure Python, no model.

Model: `p[k][r]` is the probability that head k's rank-r candidate is the right token, given that heads
< k were right (at some rank). Under this model a node (path of ranks) is accepted with probability
value(path) = prod_k p[k][path[k]], and a tree's expected accepted drafts per step is the sum of its
nodes' values. Expected tokens/s = (1 + sum of values) / step_seconds(size).

Two searches give the best tree for every node count up to a budget:
- `greedy_trees`: Medusa's construction (medusa/eval/gen_results.py), adding the most valuable frontier
  node one at a time. A child's value never exceeds its parent's (p <= 1), so the n most valuable
  nodes are prefix-closed; when each head's accuracy also falls with rank they are all reachable
  through the frontier, and greedy is optimal for every n.
- `dp_trees`: a Sequoia-style dynamic program generalised to per-depth accuracies (Sequoia assumes
  one rank vector for every depth). It is exact for any accuracy table, including what greedy's
  frontier gets wrong: Medusa's frontier offers a node's *next* sibling only (rank+1), which assumes
  accuracy falls with rank; measured tables are noisy (rank 3 may beat rank 2), and the DP then picks
  the better ranks. It also optimises under a branching limit `max_children` (at most c children per
  node, whichever ranks), which greedy's one-node-at-a-time frontier cannot express.
"""

from __future__ import annotations

import heapq
import math
from functools import lru_cache

Path = tuple[int, ...]


def path_value(p: list[list[float]], path: Path) -> float:
    v = 1.0
    for k, r in enumerate(path):
        v *= p[k][r] if r < len(p[k]) else 0.0
    return v


def expected_accepted(p: list[list[float]], paths) -> float:
    """Expected tokens per step under the model: the root (always accepted) plus each node's value."""
    return 1.0 + sum(path_value(p, tuple(q)) for q in paths)


def greedy_trees(p: list[list[float]], max_nodes: int, max_depth: int | None = None,
                 max_rank: list[int] | None = None) -> list[list[Path]]:
    """Medusa's greedy construction. Returns trees[n] for n = 0..max_nodes-1 drafted nodes (so a tree
    of n+1 nodes with the root), each the first n nodes added. Frontier: a node's next sibling (rank+1)
    and its first child (rank 0), as in Medusa's explore_graph."""
    depth = min(max_depth or len(p), len(p))
    max_rank = max_rank or [len(row) for row in p]
    chosen: list[Path] = []
    heap: list[tuple[float, Path]] = []

    def push(q: Path):  # each node enters once: from its previous sibling, or (rank 0) from its parent
        if len(q) > depth or q[-1] >= max_rank[len(q) - 1]:
            return
        heapq.heappush(heap, (-path_value(p, q), q))  # ties: shallower, then lower ranks first

    push((0,))
    trees = [[]]
    while len(chosen) < max_nodes - 1 and heap:
        _, q = heapq.heappop(heap)
        chosen.append(q)
        trees.append(list(chosen))
        push(q[:-1] + (q[-1] + 1,))
        push(q + (0,))
    return trees


def dp_trees(p: list[list[float]], max_nodes: int, max_depth: int | None = None,
             max_children: int | None = None) -> list[list[Path]]:
    """Exact optimum for every budget n < max_nodes drafted nodes, by dynamic programming over
    (depth, nodes left): F(d, m) = best expected accepted nodes in m nodes hung below an accepted node
    at depth d, a 0/1 knapsack over the ranks r of its children, each child r taking a subtree of s
    nodes worth p[d][r] * (1 + F(d+1, s-1)). With `max_children` the knapsack also counts children.
    O(depth * ranks * children * M^2). Returns trees[n] like greedy_trees (n = 0..max_nodes-1)."""
    depth = min(max_depth or len(p), len(p))
    M = max_nodes - 1
    ranks = [len(row) for row in p]
    cmax = max_children or max(ranks)

    @lru_cache(maxsize=None)
    def forest(d: int) -> tuple[list[float], list[list[tuple[int, int]]]]:
        """For a node at depth d: best[m] and choice[m] = [(rank, subtree size)] for m = 0..M."""
        if d >= depth:  # below the deepest head: no node fits
            return [0.0] + [-math.inf] * M, [[] for _ in range(M + 1)]
        below, _ = forest(d + 1)
        n_r = ranks[d]
        # H[j][c][m]: best using ranks < j, c children, m nodes. Keep argmax for reconstruction.
        neg = -math.inf
        H = [[[neg] * (M + 1) for _ in range(cmax + 1)] for _ in range(n_r + 1)]
        arg = [[[0] * (M + 1) for _ in range(cmax + 1)] for _ in range(n_r + 1)]
        H[0][0][0] = 0.0
        for j in range(1, n_r + 1):
            pr = p[d][j - 1]
            for c in range(cmax + 1):
                prev, cur, a = H[j - 1][c], H[j][c], arg[j][c]
                cur[:] = prev  # rank j-1 not used (arg 0)
                if c == 0:
                    continue
                prev_c = H[j - 1][c - 1]
                for m in range(1, M + 1):
                    for s in range(1, m + 1):
                        base = prev_c[m - s]
                        if base == neg or below[s - 1] == neg:
                            continue
                        v = base + pr * (1.0 + below[s - 1])
                        if v > cur[m] + 1e-15:
                            cur[m], a[m] = v, s
        best, choice = [0.0] * (M + 1), [[] for _ in range(M + 1)]
        for m in range(M + 1):
            c_best = max(range(cmax + 1), key=lambda c: H[n_r][c][m])
            if H[n_r][c_best][m] == neg:  # m nodes cannot be placed here (depth or width limit)
                best[m] = neg
                continue
            best[m] = H[n_r][c_best][m]
            picks, c, mm = [], c_best, m
            for j in range(n_r, 0, -1):
                s = arg[j][c][mm]
                if s:
                    picks.append((j - 1, s))
                    c, mm = c - 1, mm - s
            choice[m] = picks[::-1]
        return best, choice

    def build(d: int, prefix: Path, m: int, out: list[Path]) -> None:
        for r, s in forest(d)[1][m]:
            q = prefix + (r,)
            out.append(q)
            build(d + 1, q, s - 1, out)

    trees = []
    top, _ = forest(0)
    for m in range(M + 1):
        if top[m] == -math.inf:
            break
        out: list[Path] = []
        build(0, (), m, out)
        trees.append(sorted(out, key=lambda q: (len(q), q)))
    return trees


def interpolate(sizes: list[int], seconds: list[float], n: int) -> float:
    """Step seconds at tree size n from measured points: piecewise linear, extrapolated along the last
    segment, and made non-decreasing (a bigger tree is never cheaper; a dip is timing noise)."""
    pts = sorted(zip(sizes, seconds))
    xs, ys = [x for x, _ in pts], []
    for _, y in pts:
        ys.append(max(y, ys[-1]) if ys else y)
    if n <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if n <= x1:
            return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
    if len(xs) == 1:
        return ys[0]
    slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
    return ys[-1] + slope * (n - xs[-1])


def choose(p: list[list[float]], step_seconds, max_nodes: int, max_depth: int | None = None) -> dict:
    """The tree (up to max_nodes nodes, root included) maximising (1 + E[accepted drafts]) / step(size).
    step_seconds(size) -> seconds of one loop step with a tree of that size. Runs both searches and keeps
    the better tree for each size (they tie when accuracy falls with rank; the DP wins when a measured
    table is not sorted). Returns the chosen tree and the per-size curve."""
    greedy = greedy_trees(p, max_nodes, max_depth)
    dp = dp_trees(p, max_nodes, max_depth)
    curve = []
    for n in range(min(len(greedy), len(dp))):
        eg, ed = expected_accepted(p, greedy[n]), expected_accepted(p, dp[n])
        tree, e, by = (dp[n], ed, "dp") if ed > eg + 1e-9 else (greedy[n], eg, "greedy")
        t = step_seconds(n + 1)
        curve.append({"size": n + 1, "expected_accepted": e, "expected_accepted_greedy": eg,
                      "expected_accepted_dp": ed, "step_s": t, "tokens_per_s": e / t, "by": by, "tree": tree})
    best = max(curve, key=lambda c: c["tokens_per_s"])
    return {"best": best, "curve": curve}
