"""Measurements for `draftheads calibrate` (and the latency plot of `bench`): how often each head's
rank-r candidate is right on the backbone's own greedy continuations, how far prompt lookup's branches
would have been accepted at the same positions (with --lookup), and what one loop step costs at each
tree size on this machine. The search itself is in treesearch.py.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

from . import few_rows
from .acceptance import SamplingConfig
from .cpu_matmul import MAX_ROWS
from .draftmodel import DraftModel, trees_key
from .errors import UserError
from .generate import Decoder, Stats
from .lookup import PromptLookup
from .tree import MAX_RANK, Tree, chain
from .treesearch import greedy_trees

MISS, PAST_END = -1, -2
# Under the cut, a deeper chain replaces a shallower one in the batch table only when it is predicted this
# much faster: its extra tokens rest on the deep heads' acceptance, the part of the prediction that moves
# most with the traffic (served vicuna questions: 1.26 tokens a sequence-round for the 4-deep chain cut
# at 0.2 where the calibration prompts gave 1.68), and timed rounds here move by +-5% between repeats.
DEEPER_CHAIN_MARGIN = 0.05
# One sequence's finalists, decided by whole replies (--choose-by-replies): the trees predicted within this
# fraction of the fastest prediction. Predictions of the cut chains lie within ~4% of each other on the default
# heads (their rows' costs and the deep heads' acceptance are each uncertain by about that), too close to call.
FINALIST_MARGIN = 0.10
# Whole trees among them: the fastest predicted and the runners-up (each costs the prompts' replies once more). The
# prediction ranks neighbouring sizes within a few percent: stop 55's best predicted whole tree had 3 nodes, and the
# 2-node one that stop 54's replies had chosen was never run.
WHOLE_FINALISTS = 3
# Replies within this fraction of the fastest are a tie (16 prompts' replies move by about that between runs), which
# the finalist with the fewest rows a step wins: a deeper chain's extra tokens rest on the deep heads' acceptance,
# which falls most on traffic unlike the calibration prompts (Hydra++, stop 54: chains of 1-4 within 0.6%).
REPLY_TIE = 0.01


def head_ranks(dm: DraftModel, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """ranks [positions, heads] of head_measures."""
    return head_measures(dm, prompt_ids, continuation)[0]


@torch.inference_mode()
def head_measures(dm: DraftModel, prompt_ids: list[int], continuation: list[int],
                  probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rank of the true token in each head's top-10 at each position of a greedy continuation.

    Hidden state at position t (input token seq[t]) gives the backbone's next token seq[t+1] (the root)
    and head k's guess for seq[t+2+k], given the true path seq[t+1..t+1+k] (what a drafter that sees
    its path, Hydra, conditions on; on an accepted path the drafted tokens are the true ones). Returns
    ranks [positions, heads]: 0..9, MISS, or PAST_END where the continuation ends first. With `probs`
    (heads that cut their trees by confidence, MedusaHeads.draft_confident), also each head's softmax
    probability of its rank-r candidate [positions, heads, 10], else None. One batched forward over
    prompt + continuation (the loop's hidden states differ only in float rounding)."""
    model, heads = dm.backbone, dm.heads
    seq = prompt_ids + continuation
    ids = torch.tensor(seq, device=model.device)
    hidden = dm.decoder.engine.hidden_states(ids)  # [T, hidden]
    first, T, K = len(prompt_ids) - 1, len(seq), heads.cfg.num_heads
    top, top_p = heads.teacher_top_probs(hidden, ids, MAX_RANK) if probs else (heads.teacher_topk(hidden, ids, MAX_RANK), None)
    top = top[:, first:T - 1]  # [K, c, 10]
    target = torch.tensor(seq + [-1] * (K + 2), device=model.device)
    pos = torch.arange(first, T - 1, device=model.device)
    want = target[pos[None, :] + 2 + torch.arange(K, device=model.device)[:, None]]  # [K, c]
    hit = top == want[..., None]  # [K, c, 10]
    rank = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(want, MISS))
    rank = torch.where(want < 0, torch.full_like(want, PAST_END), rank)
    return rank.T, None if top_p is None else top_p[:, first:T - 1].transpose(0, 1)  # [c, K], [c, K, 10]


def accuracies(ranks: torch.Tensor) -> tuple[list[list[float]], list[int]]:
    """ranks [positions, heads] -> p[k][r] = P(head k's rank r is right | heads < k right at some rank),
    and the number of positions each estimate rests on."""
    p, counts = [], []
    ok = torch.ones(ranks.shape[0], dtype=torch.bool)
    for k in range(ranks.shape[1]):
        col = ranks[:, k]
        eligible = ok & (col != PAST_END)
        n = int(eligible.sum())
        p.append([float(((col == r) & eligible).sum()) / max(n, 1) for r in range(MAX_RANK)])
        counts.append(n)
        ok = ok & (col >= 0)
    return p, counts


def tree_depths(ranks: torch.Tensor, paths) -> list[int]:
    """Per recorded position, the drafts the tree would have had accepted: the longest recorded rank
    prefix that is a node of the tree."""
    nodes, out = {tuple(q) for q in paths}, []
    for row in ranks.tolist():
        d = 0
        while d < len(row) and row[d] >= 0 and tuple(row[:d + 1]) in nodes:
            d += 1
        out.append(d)
    return out


def empirical_accepted(ranks: torch.Tensor, paths) -> float:
    """Mean tokens per step the tree would have given at the recorded positions (no independence
    assumption): the root plus tree_depths."""
    depths = tree_depths(ranks, paths)
    return sum(1 + d for d in depths) / max(len(depths), 1)


def cut_rows_tokens(ranks: torch.Tensor, probs: torch.Tensor, paths, min_prob: float) -> tuple[float, float]:
    """Mean rows verified and tokens emitted per sequence and round with a tree cut to its confident nodes
    (MedusaHeads.draft_confident, what the batched step does in a pass of two or more sequences), at the
    positions head_measures recorded: ranks [positions, heads], probs [positions, heads, 10]. A node is
    kept where the product of its path's probabilities reaches `min_prob`, and accepted where its ranks
    are the recorded ones (no independence assumption). The root counts as a row and a token."""
    assert ranks.dim() == 2 and probs.shape[:2] == ranks.shape and 0 <= min_prob < 1
    rows = torch.ones(ranks.shape[0])
    depth = torch.zeros(ranks.shape[0])
    for path in paths:
        k, r = len(path), torch.tensor(path)
        kept = probs[:, torch.arange(k), r].prod(-1) >= min_prob  # [positions]; a child never above its parent
        hit = (ranks[:, :k] == r).all(-1)
        rows += kept
        depth = torch.where(kept & hit, depth.clamp(min=k), depth)
    return float(rows.mean()), float(1 + depth.mean())


def lookup_depths(lookup: PromptLookup, prompt_ids: list[int], continuation: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt lookup's counterpart of head_ranks, at the same positions: per position, the drafts its
    best branch would have had accepted (the branch's leading run of true tokens) and the nodes its
    branches add to the step's tree (counted before merging with the heads' tree: an upper bound)."""
    seq = prompt_ids + continuation
    first, T = len(prompt_ids) - 1, len(seq)
    top = lookup.teacher_topk(None, torch.tensor(seq), lookup.cfg.branches)[:, first:T - 1]  # [K, c, branches]
    K = top.shape[0]
    target = torch.tensor(seq + [-1] * (K + 2))
    want = target[torch.arange(first, T - 1)[None, :] + 2 + torch.arange(K)[:, None]]  # [K, c] tokens after the root
    hit = (top == want[..., None]) & (want[..., None] >= 0)
    depth = hit.long().cumprod(0).sum(0).max(-1).values  # [c]
    cols = top.permute(1, 2, 0).tolist()  # [c][branch][k]
    nodes = torch.tensor([len({tuple(b[:k + 1]) for b in bs for k in range(K) if b[k] >= 0}) for bs in cols])
    return depth, nodes


def with_lookup(curve: list[dict], ranks: torch.Tensor, depth: torch.Tensor, nodes: torch.Tensor, step_seconds) -> dict:
    """Each tree of the search curve verified together with the lookup branches: the recorded mean
    tokens per step (root + the longer of the heads' and the lookup's accepted runs, which is what the
    merged tree accepts), at the step time of the tree's size plus the mean lookup nodes. Adds
    `expected_accepted_hybrid` and `tokens_per_s_hybrid` to every entry; returns the best entry."""
    extra, lk = float(nodes.float().mean()) if len(nodes) else 0.0, depth.tolist()
    for c in curve:
        heads = tree_depths(ranks, c["tree"])
        c["expected_accepted_hybrid"] = sum(1 + max(a, b) for a, b in zip(heads, lk)) / max(len(lk), 1)
        c["tokens_per_s_hybrid"] = c["expected_accepted_hybrid"] / step_seconds(c["size"] + extra)
    return max(curve, key=lambda c: c["tokens_per_s_hybrid"])


def lookup_summary(lookup: PromptLookup, ranks: torch.Tensor, depth: torch.Tensor, nodes: torch.Tensor, paths) -> dict:
    """What calibrate reports for the lookup: how often it matches, how far it is accepted (per depth,
    conditional as the heads' accuracies), what it costs in nodes, and the recorded mean tokens per step
    of heads alone, lookup alone and both, for the tree `paths`."""
    from dataclasses import asdict

    matched, heads = nodes > 0, torch.tensor(tree_depths(ranks, paths), dtype=torch.long)
    acc = []
    for k in range(lookup.cfg.tokens):
        eligible = matched & (depth >= k)
        acc.append(float((eligible & (depth > k)).sum()) / max(int(eligible.sum()), 1))
    n = max(len(depth), 1)
    return {"config": asdict(lookup.cfg), "positions": len(depth), "match_rate": float(matched.sum()) / n,
            "accuracy": acc, "mean_nodes": float(nodes.sum()) / n,
            "mean_accepted_lookup_only": 1 + float(depth.sum()) / n,
            "mean_accepted_heads_only": 1 + float(heads.sum()) / n,
            "mean_accepted_hybrid": 1 + float(torch.maximum(heads, depth).sum()) / n}


def tree_of_size(size: int, num_heads: int, p=None) -> Tree:
    """A tree of `size` nodes (root included) shaped like a calibrated one: greedy on `p`, or on a
    geometric table when none is measured yet. Latency depends on the size, hardly on the shape."""
    p = p or [[0.6 * 0.5 ** r * 0.8 ** k for r in range(MAX_RANK)] for k in range(num_heads)]
    trees = greedy_trees(p, size)
    return Tree(trees[min(size - 1, len(trees) - 1)])


def trees_by_size(dm: DraftModel, sizes: list[int], p=None, trees: list[Tree] | None = None) -> dict[int, Tree]:
    """{size: tree} to time: the best tree of each size for the accuracies p (tree_of_size), or `trees`, one per size."""
    if trees is None:
        return {n: tree_of_size(n, dm.heads.cfg.num_heads, p) for n in sizes}
    assert len({t.size for t in trees}) == len(trees), "one tree per size"
    return {t.size: t for t in trees}


@torch.inference_mode()
def step_latency(dm: DraftModel, prompt_ids: list[int], sizes: list[int], steps: int = 8, p=None,
                 trees: list[Tree] | None = None) -> list[dict]:
    """Median seconds per loop step (draft, verify, accept) for trees of the given sizes (or each of
    `trees`, one per size), timed inside our own loop (Decoder.steps) after 2 warm-up steps, every node
    verified. Sizes are interleaved over rounds so that drift on a shared machine hits all alike."""
    assert dm.heads is not None
    decoder = Decoder(dm.backbone, dm.heads, None, engine=dm.engine)
    trees = trees_by_size(dm, sizes, p, trees)
    sizes = list(trees)
    samples = {n: {"draft": [], "verify": [], "accept": []} for n in sizes}
    sp = SamplingConfig()
    rounds = 2
    for _ in range(rounds):
        for n in sizes:
            stats = Stats()
            tree = trees[n]
            gen = decoder.steps(prompt_ids, (steps + 3) * (tree.depth + 1), sp, stats, tree)
            prev = (0.0, 0.0, 0.0)
            for i, _ in enumerate(gen):
                now = (stats.draft_s, stats.verify_s, stats.accept_s)
                if i >= 3:  # prefill, then 2 warm-up steps
                    for key, a, b in zip(("draft", "verify", "accept"), now, prev):
                        samples[n][key].append(a - b)
                prev = now
                if i >= steps // rounds + 2:
                    gen.close()
                    break
    out = []
    for n in sizes:
        s = {k: statistics.median(v) if v else 0.0 for k, v in samples[n].items()}
        out.append({"size": trees[n].size, "draft_s": s["draft"], "verify_s": s["verify"], "accept_s": s["accept"],
                    "step_s": s["draft"] + s["verify"] + s["accept"]})
    return out


@torch.inference_mode()
def batch_round_latency(dm: DraftModel, prompt_ids: list[int], batch: int, sizes: list[int], steps: int = 8,
                        p=None, trees: list[Tree] | None = None) -> list[dict]:
    """Median seconds of one whole round of the batched step (batch.BatchDecoder: every sequence's
    draft, one verify pass over all their nodes, acceptance and compaction) with `batch` sequences of
    the same prompt, each with a tree of each size (or each of `trees`, one per size), after 2 warm-up
    rounds. Whole rounds, not isolated forwards: those flatter large batches, whose drafting and
    bookkeeping grow with the batch too."""
    from .batch import BatchDecoder

    assert dm.heads is not None and batch >= 1
    decoder = Decoder(dm.backbone, dm.heads, None, engine=dm.engine)
    trees = trees_by_size(dm, sizes, p, trees)
    sizes = list(trees)
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    drafts: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(2):  # sizes interleaved over rounds, as in step_latency
        for n in sizes:
            tree, new = trees[n], (steps // 2 + 3) * (trees[n].depth + 1)
            bd = BatchDecoder(decoder, batch, len(prompt_ids) + new + tree.size + 1, draft_confidence=0.0)  # whole trees
            stats = [Stats() for _ in range(batch)]
            seqs = [bd.steps(prompt_ids, new, SamplingConfig(), st, tree) for st in stats]
            for s in seqs:
                next(s)  # prefill
            for i in range(steps // 2 + 2):
                t0, d0 = time.perf_counter(), stats[0].draft_s
                bd.step()
                for s in seqs:
                    next(s)
                if i >= 2:
                    samples[n].append(time.perf_counter() - t0)
                    drafts[n].append(stats[0].draft_s - d0)  # every sequence records the round's draft phase
            for s in seqs:
                s.close()
    return [{"size": trees[n].size, "step_s": statistics.median(samples[n]), "draft_s": statistics.median(drafts[n])}
            for n in sizes]


def batch_table(p, latency: dict[int, list[dict]], max_nodes: int, max_depth: int, cut=None,
                max_rows: int | None = None) -> dict[str, dict]:
    """Per batch size, the tree with the most tokens/s under its measured round latency: {"8": {"tree",
    "size", "predicted_mean_accepted", "predicted_tokens_per_s" (all sequences together),
    "plain_tokens_per_s" (the same batch without trees), "latency"}}. A size-1 tree means no tree pays.

    cut: (ranks, probs, min_probs, chain_latency {batch: [{"size", "step_s", "draft_s"}] of whole chains})
    where the batched step cuts trees, at batch sizes >= 2 (cut_rows_tokens). There the candidates are
    the chains, each cut at each of `min_probs` (without `cut`, entries of 2 or more get draft_confidence 0:
    whole trees, as chosen): a cut chain is a chain, and a batched pass verifies every
    sequence's chain in one attention call per layer, so its cost follows its rows (projections run on
    the real rows only; LlamaForward.hidden), and a chain cut to r rows verifies what a whole chain of r
    nodes does; its draft phase still runs every head the whole chain reaches. A branching tree's nodes
    attend one call each; what its cuts cost depends on how many of them still branch, which no timed
    point gives. Each candidate is scored by its recorded tokens over that cost: a line fitted to the
    timed chains' rounds without their draft phase, at its mean kept rows (a fit, not an interpolation:
    single timed rounds here move by 10-30%, and a row costs alike at 1-5 rows a sequence), plus the
    draft phase of its whole depth. Each depth takes its best cut; a deeper chain takes over only when
    DEEPER_CHAIN_MARGIN faster (pick_chain). The entry adds "draft_confidence" (the chosen cut),
    "predicted_rows", "chain_latency" and every candidate's figures ("candidates": depth,
    draft_confidence, rows and tokens per sequence-round, round_s, tokens_per_s).

    max_rows: where a pass of more rows takes other kernels (the lean forward on a CPU past
    cpu_matmul.MAX_ROWS: a step up in cost, 86 -> 180 ms from 32 to 40 rows at 8 sequences), the timed
    chains of more rows than that leave the fit (it then put a plain round of 8 at 18 ms against 34
    measured), and so do candidates whose mean rows exceed it; None: every one."""
    from .treesearch import choose, interpolate

    table = {}
    for b, lat in sorted(latency.items()):
        xs, ys = [x["size"] for x in lat], [x["step_s"] for x in lat]
        found = choose(p, lambda n: interpolate(xs, ys, n), min(max_nodes, max(xs)), max_depth)
        best, plain = found["best"], found["curve"][0]
        entry = {"tree": best["tree"], "size": best["size"], "predicted_mean_accepted": best["expected_accepted"],
                 "predicted_tokens_per_s": b * best["tokens_per_s"]}
        if cut is not None and b >= 2:
            ranks, probs, min_probs, chain_latency = cut
            entry = cut_chain_entry(ranks, probs, min_probs, chain_latency[b], b, max_nodes, max_depth, max_rows)
        elif b >= 2:  # chosen for whole trees: serve must verify them whole there
            entry["draft_confidence"] = 0.0
        table[str(b)] = {**entry, "tree": Tree(entry["tree"]).to_json(),
                         "plain_tokens_per_s": b * plain["tokens_per_s"], "latency": lat}
    return table


def cut_chain_entry(ranks: torch.Tensor, probs: torch.Tensor, min_probs, chain_latency: list[dict], batch: int,
                    max_nodes: int, max_depth: int, max_rows: int | None = None, start: int = 0) -> dict:
    """The fastest chain for `batch` sequences, each depth at its best cut of `min_probs` (batch_table's rule,
    module docstring there; pick_chain from depth `start`): {"tree", "size", "predicted_mean_accepted",
    "predicted_tokens_per_s" (all sequences together), "predicted_step_s", "draft_confidence", "predicted_rows",
    "chain_latency", "candidates"}. chain_latency: the whole chains' timed rounds or loop steps [{"size",
    "step_s", "draft_s"}]."""
    from .treesearch import interpolate

    cl = chain_latency
    cx, cd = [x["size"] for x in cl], [x.get("draft_s", 0.0) for x in cl]
    fitted = [i for i, n in enumerate(cx) if max_rows is None or batch * n <= max_rows]
    fitted = fitted if len(fitted) >= 2 else list(range(len(cx)))
    verify = line_fit([cx[i] for i in fitted], [cl[i]["step_s"] - cd[i] for i in fitted])
    candidates = []
    for t in map(chain, range(min(max_depth, max_nodes - 1, max(cx) - 1) + 1)):
        cuts = []
        for min_prob in min_probs if t.size > 1 else [0.0]:  # the root alone is never cut
            rows, tokens = cut_rows_tokens(ranks, probs, t.paths, min_prob)
            if max_rows is not None and batch * rows > max_rows and t.size > 1:
                continue
            seconds = verify(rows) + interpolate(cx, cd, t.size)
            cuts.append({"depth": t.depth, "draft_confidence": min_prob, "rows": rows, "tokens": tokens,
                         "round_s": seconds, "tokens_per_s": batch * tokens / seconds})
        candidates += cuts
    best = pick_chain(fastest_per_depth(candidates), start)
    return {"tree": chain(best["depth"]).paths, "size": best["depth"] + 1,
            "predicted_mean_accepted": best["tokens"], "predicted_tokens_per_s": best["tokens_per_s"],
            "predicted_step_s": best["round_s"], "draft_confidence": best["draft_confidence"],
            "predicted_rows": best["rows"], "chain_latency": cl, "candidates": candidates}


def fastest_per_depth(candidates: list[dict], cut_only: bool = False) -> list[dict]:
    """cut_chain_entry's candidates ({"depth", "draft_confidence", "tokens_per_s", ...}), the fastest of each chain
    depth, shallow to deep (the first of equals); cut_only: among cuts above 0 (the root alone, depth 0, has none)."""
    out: dict[int, dict] = {}
    for c in candidates:
        if (not cut_only or c["draft_confidence"] > 0) and (c["depth"] not in out or c["tokens_per_s"] > out[c["depth"]]["tokens_per_s"]):
            out[c["depth"]] = c
    return [out[d] for d in sorted(out)]


def line_fit(xs: list[float], ys: list[float]):
    """The least-squares line through the points (xs, ys), as a function of x; flat where xs are all equal."""
    assert len(xs) == len(ys) >= 1
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0
    return lambda x: my + slope * (x - mx)


def pick_chain(candidates: list[dict], start: int = 0) -> dict:
    """The chain a batch size takes, from candidates ordered shallow to deep ({"depth", "tokens_per_s", ...}):
    the fastest down to depth `start` (a depth already trusted: one sequence's best whole tree), then a deeper
    one takes over from the current pick only when it is DEEPER_CHAIN_MARGIN faster."""
    shallow = [c for c in candidates if c["depth"] <= start] or candidates[:1]
    best = max(shallow, key=lambda c: c["tokens_per_s"])
    for c in candidates[len(shallow):]:
        if c["tokens_per_s"] > best["tokens_per_s"] * (1 + DEEPER_CHAIN_MARGIN):
            best = c
    return best


def finalists(curve: list[dict], solo: dict, margin: float = FINALIST_MARGIN, whole: int = WHOLE_FINALISTS) -> list[dict]:
    """One sequence's trees worth running whole replies with: `choose`'s best whole tree, up to `whole` - 1 runners-up
    of its curve predicted within `margin` of it (trees that draft: the root alone is no runner-up), and per chain
    depth its best cut (> 0) of cut_chain_entry's candidates, those predicted within `margin` of the fastest
    prediction. The two kinds are predicted on different timings (the cut chains' scaled to the whole trees'), and
    the cuts' ran 10-25% above their replies where the whole trees' ran ~10% above (stop 56): so whole trees are
    weighed against whole trees. Each {"tree", "draft_confidence" (0: whole), "predicted_tokens_per_s",
    "predicted_mean_accepted", "predicted_step_s", "predicted_rows" (cut chains)}, the whole trees first, fastest
    first."""
    ranked = sorted(curve, key=lambda c: -c["tokens_per_s"])
    best = ranked[0]["tokens_per_s"]
    trees = ranked[:1] + [c for c in ranked[1:] if c["size"] > 1 and c["tokens_per_s"] >= (1 - margin) * best][: whole - 1]
    out = [{"tree": Tree(c["tree"]).to_json(), "draft_confidence": 0.0, "predicted_tokens_per_s": c["tokens_per_s"],
            "predicted_mean_accepted": c["expected_accepted"], "predicted_step_s": c["step_s"]} for c in trees]
    cuts = [{"tree": chain(c["depth"]).to_json(), "draft_confidence": c["draft_confidence"],
             "predicted_tokens_per_s": c["tokens_per_s"], "predicted_mean_accepted": c["tokens"],
             "predicted_step_s": c["round_s"], "predicted_rows": c["rows"]}
            for c in fastest_per_depth(solo["candidates"], cut_only=True)]
    top = max([best] + [c["predicted_tokens_per_s"] for c in cuts])
    return out + [c for c in cuts if c["predicted_tokens_per_s"] >= (1 - margin) * top]


def finalist_name(c: dict) -> str:
    """A finalist ({"tree", "draft_confidence"}) as calibrate's printout and measure_trees name it."""
    return f"{len(c['tree']) + 1} nodes " + (f"cut at {c['draft_confidence']}" if c["draft_confidence"] else "whole")


def choose_by_replies(dm: DraftModel, prompts: list[list[int]], candidates: list[dict], max_new_tokens: int,
                      bar=None) -> dict:
    """The candidate (finalists' dicts) whose greedy replies to `prompts` run fastest in the loop, each with its
    cut, interleaved per prompt (measure_trees), or of those within REPLY_TIE of the fastest the one with the fewest
    rows a step (predicted); every candidate gains "measured_tokens_per_s" and "measured_mean_accepted". Whole
    replies weigh what a step's prediction leaves out: how acceptance runs in streaks, what drafting costs at each
    depth, and the machine's drift over the minutes between timings."""
    names = [finalist_name(c) for c in candidates]
    measured = measure_trees(dm, prompts, {n: Tree(c["tree"]) for n, c in zip(names, candidates)}, max_new_tokens, bar,
                             {n: c["draft_confidence"] for n, c in zip(names, candidates)})
    for n, c in zip(names, candidates):
        c.update(measured_tokens_per_s=measured[n]["tokens_per_s"], measured_mean_accepted=measured[n]["mean_accepted"])
    fastest = max(c["measured_tokens_per_s"] for c in candidates)
    tied = [c for c in candidates if c["measured_tokens_per_s"] >= (1 - REPLY_TIE) * fastest]
    return min(tied, key=lambda c: c.get("predicted_rows", len(c["tree"]) + 1))


def lookup_finalists(curve: list[dict], margin: float = FINALIST_MARGIN, whole: int = WHOLE_FINALISTS) -> list[dict]:
    """The trees worth running whole replies with together with the lookup (curve entries that with_lookup annotated):
    the fastest predicted and up to `whole` - 1 runners-up predicted within `margin` of it, fastest first. The plain
    tree is one of them: beside the lookup's branches the heads' own nodes can cost what they bring (stop 58), and
    the predictions of the plain tree and a 2-node one lay within 0.3% of each other (stop 60)."""
    ranked = sorted(curve, key=lambda c: -c["tokens_per_s_hybrid"])
    return [c for c in ranked if c["tokens_per_s_hybrid"] >= (1 - margin) * ranked[0]["tokens_per_s_hybrid"]][:whole]


def decide_lookup(dm: DraftModel, prompts: list[list[int]], alone: dict, hybrids: list[dict], max_new_tokens: int,
                  bar=None) -> dict:
    """Whether prompt lookup (and the n-gram store) pays beside the heads for one sequence on this machine: the heads'
    own choice without it (`alone`: {"tree", "draft_confidence", "predicted_tokens_per_s"}) against the trees that
    are fastest together with it (`hybrids`: lookup_finalists, the best predicted first), on whole greedy replies to
    `prompts`, interleaved. With the lookup the fastest reply wins (within REPLY_TIE, the fewest nodes); it is taken
    only above REPLY_TIE over the heads alone (the fewer rows). No prompts: the best prediction decides. What a row
    costs decides it: on llama.cpp a row costs about a step, on torch a few percent of one (stop 58). Returns {"on",
    "decided_by", "heads_alone", "with_lookup", "with_lookup_candidates"}, the candidates with their predicted (and
    measured) tokens/s; "with_lookup" is the winner among them."""
    assert hybrids, "at least one tree with the lookup"
    cands = [{"tree": Tree(h["tree"]).to_json(), "predicted_tokens_per_s": h["tokens_per_s_hybrid"]} for h in hybrids]
    out = {"heads_alone": dict(alone), "with_lookup": cands[0], "with_lookup_candidates": cands}
    if not prompts:
        return {"on": cands[0]["predicted_tokens_per_s"] > alone["predicted_tokens_per_s"], "decided_by": "prediction", **out}
    alone_name, names = "heads alone", [f"heads + lookup, {len(c['tree']) + 1} nodes" for c in cands]
    measured = measure_trees(dm, prompts, {alone_name: Tree(alone["tree"]), **{n: Tree(c["tree"]) for n, c in zip(names, cands)}},
                             max_new_tokens, bar, {alone_name: alone["draft_confidence"]}, lookups={alone_name: False})
    for c, name in [(out["heads_alone"], alone_name), *zip(cands, names)]:
        c.update(measured_tokens_per_s=measured[name]["tokens_per_s"], measured_mean_accepted=measured[name]["mean_accepted"])
    fastest = max(c["measured_tokens_per_s"] for c in cands)
    out["with_lookup"] = min((c for c in cands if c["measured_tokens_per_s"] >= (1 - REPLY_TIE) * fastest),
                             key=lambda c: len(c["tree"]))
    on = out["with_lookup"]["measured_tokens_per_s"] > (1 + REPLY_TIE) * out["heads_alone"]["measured_tokens_per_s"]
    return {"on": on, "decided_by": "replies", **out}


def machine() -> dict:
    import os
    import platform

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            # other jobs on a shared machine move every timing: record how busy it was
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def load_parts(args) -> tuple[DraftModel, DraftModel]:
    """(speculative model with heads and tree, plain model without heads) sharing one loaded backbone. Prompt
    lookup only where asked (--lookup: calibrate then also decides whether it pays beside the heads), not by
    default: calibrate chooses the heads' own trees (lookup's branches come and go with its matches), and bench
    times lookup in methods of its own."""
    from .backbone import Backbone
    from .draftmodel import load

    heads = None if args.heads in (None, "none") else args.heads
    if heads is None:
        raise UserError("this command needs heads: pass --heads DIR (or leave the default heads)")
    dm = load(heads=heads, backbone=args.backbone, device=args.device, dtype=args.dtype, tree=getattr(args, "tree", None),
              lookup=getattr(args, "lookup", None) or False, engine=getattr(args, "engine", None))
    plain = DraftModel(Backbone(dm.backbone, dm.tokenizer, dm.backbone_name, dm.engine), None, None)
    return dm, plain


def progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=_console(), transient=False)


def _console():
    import sys

    from rich.console import Console

    return Console(file=sys.stderr)


@contextmanager
def lookup_aside(dm: DraftModel, aside: bool = True):
    """Within it `dm` drafts with its heads alone where `aside`: its loaded prompt lookup is set aside."""
    drafter = dm.decoder.drafter
    saved = drafter.lookup if drafter is not None else None
    if drafter is not None and aside:
        drafter.lookup = None
    try:
        yield
    finally:
        if drafter is not None:
            drafter.lookup = saved


def measure_trees(dm: DraftModel, prompts: list[list[int]], trees: dict[str, Tree], max_new_tokens: int, bar=None,
                  cuts: dict[str, float] | None = None, lookups: dict[str, bool] | None = None) -> dict:
    """Run generate with each tree on each prompt (tree order rotated per prompt), cut where `cuts` names a
    path probability (Decoder.min_prob), with dm's prompt lookup unless `lookups` says False; pooled figures."""
    out = {name: {"new_tokens": 0, "seconds": 0.0, "steps": 0, "accepted": 0} for name in trees}
    names, cuts, lookups = list(trees), cuts or {}, lookups or {}

    def run(ids, name, n):
        saved = dm.decoder.tree, dm.decoder.min_prob
        dm.decoder.tree, dm.decoder.min_prob = trees[name], cuts.get(name, 0.0)  # the loop's own tree, as loaded
        try:
            with lookup_aside(dm, not lookups.get(name, True)):
                return dm.generate(torch.tensor(ids), max_new_tokens=n)
        finally:
            dm.decoder.tree, dm.decoder.min_prob = saved

    for name in names:  # warm-up
        run(prompts[0], name, min(max_new_tokens, 16))
    task = bar.add_task("measure", total=len(prompts) * len(names)) if bar else None
    for i, ids in enumerate(prompts):
        for name in names[i % len(names):] + names[:i % len(names)]:
            r = run(ids, name, max_new_tokens)
            o = out[name]
            o["new_tokens"] += r.stats.new_tokens
            o["seconds"] += r.stats.total_s
            o["steps"] += len(r.stats.accepted)
            o["accepted"] += sum(r.stats.accepted)
            if bar:
                bar.advance(task)
    for o in out.values():
        o["mean_accepted"] = o["accepted"] / max(o["steps"], 1)
        o["tokens_per_s"] = o["new_tokens"] / o["seconds"] if o["seconds"] else 0.0
    return out


def run_calibrate(args) -> dict:
    from .questions import load_questions
    from .tree import MEDUSA63, load_tree, truncate
    from .treesearch import choose, expected_accepted, interpolate

    if args.max_nodes < 1 or args.max_new_tokens < 2:
        raise UserError("--max-nodes must be >= 1 and --max-new-tokens >= 2")
    if not all(0 <= c < 1 for c in args.draft_confidence):
        raise UserError("--draft-confidence must be at least 0 and below 1")
    if args.choose_by_replies < 0:
        raise UserError("--choose-by-replies must be at least 0 (0: the prediction decides)")
    questions = load_questions(args.prompts, args.limit)
    dm, plain = load_parts(args)
    K = dm.heads.cfg.num_heads
    prompts = [plain.prompt_ids(q.turns[0]) for q in questions]
    lookup = PromptLookup(dm.lookup, dm.ngrams) if dm.lookup else None
    ranks, probs, lk = [], [], []
    # Heads that cut their trees to their confident nodes (draft_confident): the batch table is chosen for the
    # cut, and one sequence (the loop) takes a cut chain where it beats the best whole tree
    cut = max(args.draft_confidence) > 0 and hasattr(dm.heads, "draft_confident")
    chains = [chain(d) for d in range(min(K, args.max_nodes - 1) + 1)]  # what a cut is chosen among
    with progress() as bar:
        task = bar.add_task("accuracies", total=len(prompts))
        for ids in prompts:
            cont = plain.generate(torch.tensor(ids), max_new_tokens=args.max_new_tokens).token_ids
            r, pr = head_measures(dm, ids, cont, probs=cut)
            ranks.append(r)
            probs.append(pr)
            if lookup is not None:
                lk.append(lookup_depths(lookup, ids, cont))
            bar.advance(task)
        ranks = torch.cat(ranks)
        p, counts = accuracies(ranks)
        sizes = sorted({s for s in args.latency_sizes if s <= args.max_nodes} | {1, args.max_nodes})
        task = bar.add_task("latency", total=None)
        latency = step_latency(dm, max(prompts, key=len), sizes, steps=args.latency_steps, p=p)
        bar.update(task, total=1, completed=1)
        xs, ys = [x["size"] for x in latency], [x["step_s"] for x in latency]
        by_batch, chain_latency = {}, {}
        if args.batch_sizes:
            task = bar.add_task("batched rounds", total=len(args.batch_sizes))
            longest = max(prompts, key=len)
            for b in args.batch_sizes:
                by_batch[b] = batch_round_latency(dm, longest, b, sizes, steps=args.latency_steps, p=p)
                if cut and b >= 2:  # what the cut chains cost (batch_table)
                    chain_latency[b] = batch_round_latency(dm, longest, b, [], steps=args.latency_steps, trees=chains)
                bar.advance(task)
        found = choose(p, lambda n: interpolate(xs, ys, n), args.max_nodes, K)
        best = found["best"]
        solo_cut = solo = replies = None
        if cut:  # chains cut to their confident nodes, timed whole in the loop
            task = bar.add_task("cut chains", total=None)
            timed = step_latency(dm, max(prompts, key=len), [], steps=args.latency_steps, trees=chains)
            bar.update(task, total=1, completed=1)
            # Timed minutes after the whole trees, on a machine whose speed drifts by 10% in that time: on the
            # whole trees' scale (their plain steps' ratio), so that the two are compared, not the two minutes
            scale = interpolate(xs, ys, 1) / timed[0]["step_s"]
            scaled = [{**x, "step_s": x["step_s"] * scale, "draft_s": x["draft_s"] * scale} for x in timed]
            whole = Tree(best["tree"])  # the cut chain may go as deep as the best whole tree without a margin
            start = whole.depth if all(set(path) == {0} for path in whole.paths) else 0
            solo = cut_chain_entry(ranks, torch.cat(probs), args.draft_confidence, scaled, 1, args.max_nodes, K,
                                   start=start)
            solo.update(chain_latency=timed, chain_scale=scale)
            finals = finalists(found["curve"], solo)
            if args.choose_by_replies and len(finals) > 1:  # whole replies decide
                with lookup_aside(dm):  # the heads' own choice; lookup beside it is decided below
                    won = choose_by_replies(dm, prompts[: args.choose_by_replies], finals, args.max_new_tokens, bar)
                solo_cut = won if won["draft_confidence"] > 0 else None
                if solo_cut is None:  # a whole tree won: the best predicted or a runner-up
                    best = next(c for c in found["curve"] if Tree(c["tree"]).to_json() == won["tree"])
                replies = {"prompts": min(args.choose_by_replies, len(prompts)), "candidates": finals}
            elif solo["draft_confidence"] > 0 and solo["predicted_tokens_per_s"] > best["tokens_per_s"]:  # the prediction
                solo_cut = solo
        decision = None
        if lookup is not None:  # the heads' own choice against the tree that is fastest together with the lookup
            lk_depth, lk_nodes = torch.cat([d for d, _ in lk]), torch.cat([n for _, n in lk])
            with_lookup(found["curve"], ranks, lk_depth, lk_nodes, lambda n: interpolate(xs, ys, n))
            hybrids = lookup_finalists(found["curve"])
            alone = ({k: solo_cut[k] for k in ("tree", "draft_confidence", "predicted_tokens_per_s")} if solo_cut else
                     {"tree": Tree(best["tree"]).to_json(), "draft_confidence": 0.0, "predicted_tokens_per_s": best["tokens_per_s"]})
            decision = decide_lookup(dm, prompts[: args.choose_by_replies], alone, hybrids, args.max_new_tokens, bar)
            hybrid = next(h for h in hybrids if Tree(h["tree"]).to_json() == decision["with_lookup"]["tree"])
            if decision["on"]:
                best, solo_cut = hybrid, None
        chosen = Tree(best["tree"] if solo_cut is None else solo_cut["tree"])
        m63 = Tree(truncate(MEDUSA63, K))
        result = {
            "tree": chosen.to_json(), "size": chosen.size, "depth": chosen.depth, "search": best["by"],
            "predicted_mean_accepted": best["expected_accepted"],
            "predicted_mean_accepted_empirical": empirical_accepted(ranks, chosen.paths),
            "predicted_tokens_per_s": best["tokens_per_s"], "predicted_step_s": best["step_s"],
            "medusa63": {"size": m63.size, "predicted_mean_accepted": expected_accepted(p, m63.paths),
                         "predicted_mean_accepted_empirical": empirical_accepted(ranks, m63.paths),
                         "predicted_tokens_per_s": expected_accepted(p, m63.paths) / interpolate(xs, ys, m63.size)},
            "accuracy": p, "accuracy_positions": counts, "positions": len(ranks), "prompts": len(prompts),
            "latency": latency, "curve": [{k: v for k, v in c.items() if k != "tree"} for c in found["curve"]],
            "heads": str(args.heads), "backbone": dm.backbone_name, "max_new_tokens": args.max_new_tokens,
            "device": args.device, "machine": machine(),
            "calibrated_for": trees_key(dm.decoder.device, dm.decoder.dtype, "llama.cpp" if dm.engine is not None else None,
                                        few_rows.cpu_class() if args.cpu_class else None),
        }
        if solo_cut is not None:  # the loop's figures are the cut chain's
            result.update({"search": "cut chain", "predicted_mean_accepted": solo_cut["predicted_mean_accepted"],
                           "predicted_mean_accepted_empirical": solo_cut["predicted_mean_accepted"],
                           "predicted_tokens_per_s": solo_cut["predicted_tokens_per_s"],
                           "predicted_step_s": solo_cut["predicted_step_s"], "draft_confidence": solo_cut["draft_confidence"],
                           "predicted_rows": solo_cut["predicted_rows"], "whole_tree": Tree(best["tree"]).to_json(),
                           "whole_tree_predicted_tokens_per_s": best["tokens_per_s"]})
        if replies is not None:  # one sequence's finalists and what their replies ran at
            result["chosen_by_replies"] = replies
        if solo is not None:  # what the chains cut for one sequence were predicted to give, chosen or not
            result["cut_chains"] = {k: solo[k] for k in ("tree", "draft_confidence", "predicted_tokens_per_s",
                                                          "chain_latency", "chain_scale", "candidates")}
        if by_batch:
            few_rows_regime = dm.decoder.device.type == "cpu" and dm.decoder.lean is not None  # cpu_matmul's routes
            result["batch_trees"] = batch_table(p, by_batch, args.max_nodes, K,
                                                (ranks, torch.cat(probs), args.draft_confidence, chain_latency) if cut else None,
                                                max_rows=MAX_ROWS if few_rows_regime else None)
            if (solo_cut is not None or replies is not None or decision is not None) and "1" in result["batch_trees"]:
                # one tree (and cut) for one sequence, in the loop and in the batched step alike: the loop's choice, cut
                # or whole, where the prediction (a cut) or the replies decided it (with or without the lookup)
                one = result["batch_trees"]["1"]
                for k in ("draft_confidence", "predicted_rows"):
                    one.pop(k, None)
                one.update({k: result[k] for k in ("tree", "size", "predicted_mean_accepted", "predicted_tokens_per_s",
                                                    "draft_confidence", "predicted_rows") if k in result})
        with_lookup_on = decision is not None and decision["on"]
        if decision is not None:
            result["lookup"] = {**lookup_summary(lookup, ranks, lk_depth, lk_nodes, chosen.paths),
                                "predicted_tokens_per_s": hybrid["tokens_per_s_hybrid"], **decision}
        if args.measure:
            measured = measure_trees(dm, prompts[: args.measure_limit or None], {"calibrated": chosen, "medusa63": m63},
                                     args.max_new_tokens, bar, {"calibrated": result.get("draft_confidence", 0.0)},
                                     {"calibrated": decision is None or with_lookup_on, "medusa63": decision is None or with_lookup_on})
            result["measured"] = measured
            result["measured_mean_accepted"] = measured["calibrated"]["mean_accepted"]
            predicted = best["expected_accepted_hybrid"] if with_lookup_on else result["predicted_mean_accepted"]
            result["prediction_error"] = predicted / measured["calibrated"]["mean_accepted"] - 1
            result["speedup_vs_medusa63"] = (measured["calibrated"]["tokens_per_s"]
                                             / max(measured["medusa63"]["tokens_per_s"], 1e-9))
    load_tree(result["tree"], K)  # what we write must load
    return result
