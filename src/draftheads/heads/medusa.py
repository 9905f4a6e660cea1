"""Medusa heads: K independent heads on the backbone's last hidden state.

Head k (0-based) predicts the token k+2 positions after the last verified one, that is k+1 positions
beyond the backbone's own next token. Each head is L residual blocks `x + SiLU(W x + b)` and an LM head
that is its own or the backbone's (shared, frozen). With VocabTrim the LM head covers only the
`vocab_map` ids (the backbone's most frequent tokens) and drafts are mapped back to full ids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from .. import few_rows
from ..cpu_matmul import linear as few_row_linear, packed_rows
from ..defaults import GROUNDED_RESIDUALS
from ..errors import UserError
from ..tree import MAX_RANK, Tree
from ..weight_state import WeightState


HEAD_TYPES = ("medusa", "hydra", "hydra++")


def _batch_size(key) -> bool:
    return isinstance(key, str) and key.isdigit() and int(key) >= 1


def _cuts(d) -> bool:
    """Whether `d` maps batch sizes to probabilities a node needs (batch_draft_confidence)."""
    return isinstance(d, dict) and all(_batch_size(b) and isinstance(c, (int, float)) and not isinstance(c, bool)
                                       and 0 <= c < 1 for b, c in d.items())


def _heads_alone(v) -> bool:
    """Whether `v` is a `heads_alone` entry: None, or {"tree": a list of paths, "draft_confidence": a cut or None}."""
    return v is None or (isinstance(v, dict) and set(v) <= {"tree", "draft_confidence"} and isinstance(v.get("tree"), list)
                         and (v.get("draft_confidence") is None or _cuts({"1": v["draft_confidence"]})))


@dataclass
class HeadsConfig:
    """What `config.json` of a native heads directory holds. Unknown keys are an error."""

    num_heads: int
    hidden_size: int
    vocab_size: int  # the backbone's full vocabulary
    num_layers: int = 1
    head_type: str = "medusa"
    lm_head: str = "own"  # "own" (a Linear per head) or "shared" (the backbone's output embedding)
    trimmed_vocab: int | None = None  # VocabTrim: size of the kept vocabulary; ids stored as `vocab_map`
    backbone: str = ""  # name or path of the backbone the heads were trained on
    backbone_fingerprint: list[float] = field(default_factory=list)
    tree: list[list[int]] | None = None  # a calibrated tree, used by default when present
    # `calibrate --batch-sizes`: {"8": tree} the tree of the batched step at 8 running sequences (used
    # from that batch size up to the next entry's)
    batch_trees: dict[str, list[list[int]]] | None = None
    # ... and {"8": 0.4}: the path probability a node of those trees needs to be verified in a pass of 8
    # or more sequences (batch.BatchDecoder's draft_confidence, chosen with the tree); "1": one sequence's,
    # in the decoding loop too (generate.Decoder's min_prob, for `tree`)
    batch_draft_confidence: dict[str, float] | None = None
    # `calibrate --lookup`: whether prompt lookup (and the n-gram store) paid beside `tree` for one sequence,
    # measured on whole replies; what `load(lookup=None)` then takes. None: not decided (the default rule)
    lookup: bool | None = None
    # ... and where it paid, the heads' own choice for one sequence without it: {"tree": ..., "draft_confidence": the
    # cut or null}, what `load` takes where lookup is off (--no-lookup; bench's heads-alone method). `tree` was chosen
    # beside the lookup and can be another (plain, even: the lookup alone). None: `tree` serves both
    heads_alone: dict | None = None
    # Trees calibrated where the backbone runs other than on a CPU in float32 (what `tree`, `batch_trees`
    # and `batch_draft_confidence` are for): {"cpu bfloat16": {"tree": ..., "batch_trees": ...,
    # "batch_draft_confidence": ...}}, taken there instead (a bf16 verify costs another curve:
    # docs/verify_profile.md).
    device_trees: dict[str, dict] | None = None
    dropout: float = 0.0  # Hydra++ trains with dropout before every block and the LM head
    # Hydra heads' first block: the residual path is a learned projection of [h, E(path)] ("projection",
    # Hydra's) or h itself ("hidden": half the parameters, what fits the shipped Hydra++ heads in 40 MB)
    grounded_residual: str = "projection"
    # Hydra++: the prefix layer's input at position t is fc([h_t, E(x_t+1)]) (EAGLE's pairing of a hidden state
    # with the token it produced) instead of h_t; at the last verified position x_t+1 is the root
    prefix_token: bool = False
    # Medusa-2: the LoRA adapter trained with the heads (a path relative to the heads directory), which
    # `draftheads.load` merges into the backbone, and the weights it changed most, so that the heads refuse
    # the untuned backbone (adapter.py). Empty for Medusa-1 and Hydra heads.
    adapter: str | None = None
    tuned_fingerprint: list[dict] = field(default_factory=list)
    format: str = "draftheads/1"

    @classmethod
    def from_dict(cls, d: dict) -> "HeadsConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown keys in heads config: {', '.join(unknown)}")
        missing = [k for k in ("num_heads", "hidden_size", "vocab_size") if k not in d]
        if missing:
            raise UserError(f"heads config lacks {', '.join(missing)}")
        cfg = cls(**d)
        if cfg.batch_trees is not None and not (isinstance(cfg.batch_trees, dict) and all(map(_batch_size, cfg.batch_trees))):
            raise UserError("heads config: batch_trees must map batch sizes (\"1\", \"8\", ...) to trees")
        if cfg.batch_draft_confidence is not None and not _cuts(cfg.batch_draft_confidence):
            raise UserError("heads config: batch_draft_confidence must map batch sizes (\"2\", \"8\", ...) to "
                            "probabilities in [0, 1)")
        if cfg.lookup is not None and not isinstance(cfg.lookup, bool):
            raise UserError(f"heads config: lookup must be true, false or null, not {cfg.lookup!r}")
        if not _heads_alone(cfg.heads_alone):
            raise UserError("heads config: heads_alone must be null or {\"tree\": [...], \"draft_confidence\": a "
                            "probability in [0, 1) or null}")
        if cfg.device_trees is not None and not (isinstance(cfg.device_trees, dict) and all(
                isinstance(k, str) and (len(k.split()) == 2 or len(k.split()) == 3 and k.split()[2] in few_rows.CPU_CLASSES)
                and isinstance(v, dict)
                and set(v) <= {"tree", "batch_trees", "batch_draft_confidence", "lookup", "heads_alone"}
                and isinstance(v.get("lookup"), (bool, type(None))) and _heads_alone(v.get("heads_alone"))
                and all(map(_batch_size, v.get("batch_trees") or {})) and _cuts(v.get("batch_draft_confidence") or {})
                for k, v in cfg.device_trees.items())):
            raise UserError("heads config: device_trees must map \"DEVICE DTYPE [CPU CLASS]\" (\"cpu bfloat16\", \"llama.cpp cpu\", "
                            f"\"cpu float32 avx2\"; classes: {', '.join(few_rows.CPU_CLASSES)}) to "
                            "{\"tree\": ..., \"batch_trees\": ..., \"batch_draft_confidence\": ..., \"lookup\": ..., "
                            "\"heads_alone\": ...}")
        if cfg.lm_head not in ("own", "shared"):
            raise UserError(f"heads config: lm_head must be 'own' or 'shared', not {cfg.lm_head!r}")
        if cfg.grounded_residual not in GROUNDED_RESIDUALS:
            raise UserError(f"heads config: grounded_residual must be {' or '.join(map(repr, GROUNDED_RESIDUALS))}, "
                            f"not {cfg.grounded_residual!r}")
        if cfg.head_type not in HEAD_TYPES:
            raise UserError(f"heads of type {cfg.head_type!r} are not supported (known: {', '.join(HEAD_TYPES)})")
        if cfg.prefix_token and cfg.head_type != "hydra++":
            raise UserError("heads config: prefix_token applies to hydra++ heads only")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """A head's product: fp32 on a CPU through cpu_matmul's few-row routing (the shipped Medusa heads' draft
    0.85 -> 0.55 ms, 2 threads), other dtypes through F.linear (bf16: cpu_matmul pads one row to two for
    exactness, which drafts do not need, and it cost 0.33 -> 0.40 ms; scripts/time_drafters.py)."""
    return few_row_linear(x, w, b) if x.dtype == torch.float32 else nn.functional.linear(x, w, b)


class ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        # Zero weight: the block starts as (almost) the identity, so an untrained head starts as the
        # backbone's own next-token predictor rather than noise.
        nn.init.zeros_(self.linear.weight)

    def forward(self, x):
        return x + nn.functional.silu(linear(x, self.linear.weight, self.linear.bias))


class DraftHeads(nn.Module):
    """What Medusa and Hydra heads share: an LM head per head (its own, or the backbone's output rows:
    shared, frozen) and VocabTrim's id map."""

    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        self.cfg = cfg
        out = cfg.trimmed_vocab or cfg.vocab_size
        self.lm_heads = (nn.ModuleList(nn.Linear(cfg.hidden_size, out, bias=False) for _ in range(cfg.num_heads))
                         if cfg.lm_head == "own" else None)
        # Full-vocabulary id of each trimmed id; None without VocabTrim.
        self.register_buffer("vocab_map", torch.arange(out) if cfg.trimmed_vocab else None)
        self.shared_weight: torch.Tensor | None = None  # [out, hidden], set by attach() for lm_head="shared"

    def attach(self, backbone: nn.Module):
        """Give shared-LM-head heads the backbone's output embedding (rows of the kept vocabulary)."""
        if self.lm_heads is None:
            w = backbone.get_output_embeddings().weight.detach()
            self.shared_weight = w[self.vocab_map] if self.vocab_map is not None else w
        return self

    def init_lm_heads_from(self, backbone: nn.Module) -> None:
        """Each head's own LM head starts as a copy of the backbone's (its kept rows under VocabTrim)."""
        if self.lm_heads is None:
            return
        w = backbone.get_output_embeddings().weight.detach()
        w = w[self.vocab_map] if self.vocab_map is not None else w
        for lm in self.lm_heads:
            lm.weight.data.copy_(w.to(lm.weight.dtype))

    def lm_logits(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Head k's LM head: x [..., hidden] -> logits [..., out_vocab] (trimmed ids under VocabTrim)."""
        if self.lm_heads is not None:
            return linear(x, self.lm_heads[k].weight)
        assert self.shared_weight is not None, "call attach(backbone) before drafting with a shared LM head"
        return linear(x, self.shared_weight)

    def to_full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.vocab_map[ids] if self.vocab_map is not None else ids

    def for_sequence(self) -> "DraftHeads":
        """The drafter of one sequence among several decoded together (batch.py): these heads when they keep
        no state between steps."""
        return self


def top_probs(values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities (float32) of the top-k `values` [..., k] taken from `logits` [..., vocab]: what
    draft_confident cuts by, and what calibrate replays."""
    return (values.float() - logits.float().logsumexp(-1, keepdim=True)).exp()


def _cut(tree: Tree, ids: list[int], probs: list[float], min_prob: float, device) -> tuple[Tree, torch.Tensor]:
    """draft_confident's cut of one sequence: ids [nodes] and the heads' probability of each non-root node's token
    [nodes - 1] -> (the cut of `tree`, ids [its nodes]). A node's path probability is its parent's times its own,
    rounded to float32 at each node, and it is kept where that reaches min_prob (in float32): a child never keeps
    more than its parent, so the kept nodes form a tree."""
    floor, path, keep = np.float32(min_prob), [np.float32(1.0)], [True]
    for node in range(1, tree.size):
        path.append(np.float32(path[tree.parent[node]] * np.float32(probs[node - 1])))
        keep.append(bool(path[-1] >= floor))
    cut = tree.cut(tuple(keep))
    return cut, torch.tensor(ids if cut is tree else [i for i, k in zip(ids, keep) if k], device=device)


class MedusaHeads(DraftHeads):
    def __init__(self, cfg: HeadsConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(nn.Sequential(*[ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)])
                                    for _ in range(cfg.num_heads))
        # _packed_top's arguments per number of heads, with what they were packed from (_top_arguments)
        self._top_args: dict[int, tuple] = {}

    def forward(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """hidden [..., hidden_size] -> logits [n, ..., out_vocab] (trimmed ids under VocabTrim) of the
        first n = num_heads (default all) heads."""
        n = len(self.blocks) if num_heads is None else min(num_heads, len(self.blocks))
        # indexed, not sliced: a sliced ModuleList is a new module (7 us of a ~0.3 ms draft)
        return torch.stack([self.lm_logits(k, self.blocks[k](hidden)) for k in range(n)])

    # ---------------------------------------------------------------- the drafter contract

    def reset(self) -> None:
        """Medusa heads keep no state between steps."""

    def observe(self, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Medusa heads keep no state between steps."""

    def draft(self, hidden: torch.Tensor, root: torch.Tensor, tree: Tree) -> torch.Tensor:
        """Candidate token per tree node: hidden [hidden_size] at the last verified position, root 0-d
        token id of node 0. Returns ids [nodes]: draft_many's for one sequence. Where the heads' weights pack,
        their top ids come from one C++ call (_packed_top) and the nodes are picked in Python: the loop drafts
        every step, and draft_many's small ops (stack, index, transpose, cat) cost as much as the heads' two
        products there."""
        assert hidden.dim() == 1 and root.dim() == 0
        if tree.size == 1:
            return root.view(1)
        if torch.is_grad_enabled():  # called outside the loop's inference mode
            with torch.no_grad():
                return self.draft(hidden, root, tree)
        top = self._packed_top(hidden.view(1, -1), tree.depth, tree.topk)  # ([heads, 1, topk] full ids, empty) or None
        if top is None:  # the per-op path
            return self.draft_many(hidden[None], root.view(1), tree)[0]
        tops = top[0].tolist()  # per head its top ids, best first
        ranked = tree.paths[:tree.ranked_size - 1]  # head len(p) - 1 drafts node p, its rank p[-1]
        return torch.tensor([int(root)] + [tops[len(p) - 1][0][p[-1]] for p in ranked], device=hidden.device)

    def _packed_top(self, x: torch.Tensor, heads: int, k: int, probs: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first `heads` heads' top-k ids [heads, rows, k] (full ids: through VocabTrim's map) and with `probs`
        their softmax probabilities [heads, rows, k] (float32, top_probs'; else empty) for x [rows, H] in one C++ call
        (few_rows.heads_top: the products linear() would run, the same ids), where every weight is packed and x is what
        linear() sends to the packed kernel (CPU float32, no gradient, rows within cpu_matmul.packed_rows()); else None."""
        if not (x.is_cpu and x.dtype == torch.float32 and self.lm_heads is not None and not torch.is_grad_enabled()
                and x.shape[0] <= packed_rows()):
            return None
        # The call's argument lists are kept while every weight is the one they were packed from, unwritten: gathering
        # them (module lookups, few_rows.packed per weight) cost ~60 us a step in the loop, right after a verify pass
        # has pushed the interpreter out of the caches, where the call itself took ~130.
        args = self._top_args.get(heads)
        if args is None or args[0].state() is not args[1]:
            args = self._top_args[heads] = self._top_arguments(heads)
        _, _, module, blocks, lm, out = args
        if module is None:
            return None
        return module.heads_top(x.contiguous(), blocks, len(self.blocks[0]), lm, out, k, few_rows.activations() == "int8",
                                few_rows._EMPTY if self.vocab_map is None else self.vocab_map, probs)

    def _top_arguments(self, heads: int) -> tuple:
        """(weights, state, module, blocks, lm, out) for heads_top, module None where some weight does not pack as
        linear() routes it (contiguous and packable) or the kernel is not built; the lists stay valid while the
        weights' WeightState gives `state` again."""
        module = few_rows.load()
        weights = WeightState([block.linear for h in range(heads) for block in self.blocks[h]]
                              + [self.lm_heads[h] for h in range(heads)])
        blocks, lm, out = [], [], []
        for h in range(heads):
            for block in self.blocks[h]:
                w, b = block.linear.weight, block.linear.bias
                p = few_rows.packed(w) if w.is_contiguous() else None  # as linear() routes it
                if p is None:
                    module = None
                    continue
                blocks += [p.q, p.d, few_rows._EMPTY if p.m is None else p.m, few_rows._EMPTY if b is None else b]
            w = self.lm_heads[h].weight
            p = few_rows.packed(w) if w.is_contiguous() else None
            if p is None:
                module = None
                continue
            lm += [p.q, p.d, few_rows._EMPTY if p.m is None else p.m]
            out.append(p.out)
        return weights, weights.state(), module, blocks, lm, out

    @torch.no_grad()
    def draft_many(self, hidden: torch.Tensor, roots: torch.Tensor, tree: Tree) -> torch.Tensor:
        """`draft` for B sequences on the same tree in one call (a batched step: one product per head
        instead of B). hidden [B, hidden_size], roots [B] -> ids [B, nodes]."""
        return self._draft_many(hidden, roots, tree, False)[0]

    @torch.no_grad()
    def draft_confident(self, hidden: torch.Tensor, roots: torch.Tensor, tree: Tree, min_prob: float) -> list[tuple[Tree, torch.Tensor]]:
        """`draft_many`, each sequence cut to the nodes whose path the heads give at least `min_prob`: the
        product of the heads' softmax probabilities of the node's token and its ancestors' (the root: 1).
        Where a node is unlikely, verifying it costs a row of the pass for little; in a batch those rows
        add up (docs/serving.md). Returns per sequence (its tree, a cut of `tree`; ids [its nodes]). One sequence
        whose heads pack (the loop's, a server's lone client) takes draft's one C++ call, which gives the
        probabilities too: the per-op path cost ~0.25 ms a step more there (scripts/step_phases.py --min-prob)."""
        lone = self._packed_top(hidden, tree.depth, tree.topk, True) if hidden.shape[0] == 1 and tree.size > 1 else None
        if lone is not None:
            head_ids, head_probs = (t.tolist() for t in lone)  # per head [1][topk]
            ranked = tree.paths[:tree.ranked_size - 1]  # head len(p) - 1 drafts node p, its rank p[-1]
            rows = [([int(roots[0])] + [head_ids[len(p) - 1][0][p[-1]] for p in ranked],
                     [head_probs[len(p) - 1][0][p[-1]] for p in ranked])]
        else:
            ids, prob = self._draft_many(hidden, roots, tree, True)  # [B, nodes], [B, nodes - 1]
            rows = zip(ids.tolist(), prob.tolist())
        return [_cut(tree, row, node_probs, min_prob, hidden.device) for row, node_probs in rows]

    def _draft_many(self, hidden: torch.Tensor, roots: torch.Tensor, tree: Tree, probs: bool):
        """ids [B, nodes] and, if `probs`, the heads' softmax probability of each non-root node's token
        [B, nodes - 1] (float32), else None."""
        assert hidden.dim() == 2 and roots.shape == hidden.shape[:1]
        tt = tree.tensors(hidden.device, hidden.dtype)
        # Only the heads the tree reaches: a depth-2 tree on 4 heads pays for 2 (on CPU each full head
        # costs ~1 ms of a ~65 ms step).
        logits = self.forward(hidden.to(self.blocks[0][0].linear.weight.dtype), max(tree.depth, 1))  # [used, B, out]
        top = logits.topk(tree.topk, dim=-1)  # [used, B, topk]
        ids = torch.cat([roots[:, None], self.to_full_ids(top.indices)[tt.head_of, :, tt.rank_of].T], 1)  # [B, nodes]
        if not probs:
            return ids, None
        p = top_probs(top.values, logits)  # [used, B, topk]
        return ids, p[tt.head_of, :, tt.rank_of].T

    @torch.no_grad()
    def teacher_topk(self, hidden: torch.Tensor, ids: torch.Tensor, n: int = MAX_RANK, chunk: int = 256) -> torch.Tensor:
        """hidden [T, H] of a whole sequence -> each head's top-n full ids [K, T, n] at each position
        (Medusa heads ignore the path ids [T]). What `calibrate` measures."""
        return self._teacher_top(hidden, n, chunk, False)[0]

    def teacher_top_probs(self, hidden: torch.Tensor, ids: torch.Tensor | None = None, n: int = MAX_RANK,
                          chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> each head's top-n full ids [K, T, n] and their softmax probabilities [K, T, n]
        (float32, as `draft_confident` computes them): what `calibrate` needs to predict that cut. The path
        ids [T] are not used (Medusa heads do not see them)."""
        return self._teacher_top(hidden, n, chunk, True)

    @torch.no_grad()
    def _teacher_top(self, hidden: torch.Tensor, n: int, chunk: int, probs: bool):
        w = self.blocks[0][0].linear.weight
        ids, ps = [], []
        for s in range(0, hidden.shape[0], chunk):
            logits = self(hidden[s:s + chunk].to(w.dtype))  # [K, c, out]
            top = logits.topk(n, dim=-1)
            ids.append(self.to_full_ids(top.indices))
            if probs:
                ps.append(top_probs(top.values, logits))
        return torch.cat(ids, 1), torch.cat(ps, 1) if probs else None
