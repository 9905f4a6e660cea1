"""What the loop must know about a backbone's family, and which backbones it refuses.

The loop runs a backbone's decoder stack on its own cache and tree masks (generate.py) and then the
output embedding. That reproduces the model exactly when:
- attention takes our additive 4D mask: `sdpa` or `eager` (flash kernels build their own causal mask
  and would let sibling tree nodes see each other);
- every layer is full or sliding-window attention (kvcache.attention_windows builds the masks);
- whatever the model does to its logits after the output embedding is done here too (`logits_transform`:
  Gemma-2/3 softcapping, Cohere's and Granite's logit scales);
- the positions of one forward do not change the rotary frequencies (`context_length`: longrope).
Config-level reasons come first (`refusal`); then `probe` runs a tiny tree step both ways and compares
every logit, which catches the rest (a forward that ignores the mask or position ids, an unknown
logit transform). A backbone that fails is refused at load with one line: a silent wrong answer is the
worst failure this project can have.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .errors import UserError
from .kvcache import SLIDING, TreeKVCache, attention_windows
from .tree import Tree

MASKABLE_ATTENTION = ("sdpa", "eager")

# The probe: a 6-token prefix and a 4-node tree (root; [0] and [1] under it; [0, 0] under [0]).
PROBE_PREFIX = 6
PROBE_TREE = Tree([[0], [1], [0, 0]])
PROBE_PATHS = [[0, 1, 3], [0, 2]]  # root-to-leaf node lists of PROBE_TREE: every node on one of them
PROBE_WINDOW = 4  # sliding windows are shrunk to this for the probe, so that the window matters in it


def refusal(model) -> str | None:
    """Why the loop cannot decode `model` exactly, judged from its config alone, or None."""
    cfg = model.config
    attn = getattr(cfg, "_attn_implementation", None) or "eager"
    if attn not in MASKABLE_ATTENTION:
        return f"attention implementation {attn!r} ignores tree masks; load it with sdpa or eager"
    if getattr(cfg, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    try:
        attention_windows(cfg)
    except UserError as e:
        return str(e)
    return _unmasked_window(cfg)


# Windows some families apply by their own means, not through the masks the loop passes, so a tree node
# (whose cache slot L + i lies past its position L + d) would lose keys that plain decoding shows it.
OWN_WINDOWS = ("attention_chunk_size", "local_attention_window_len", "keep_window_size", "attention_window_size")


def _unmasked_window(cfg) -> str | None:
    context = getattr(cfg, "max_position_embeddings", None) or 1 << 30
    if "local" in (getattr(cfg, "attention_layers", None) or []) and cfg.window_size < context:
        return f"its local attention layers (GPT-Neo, window_size={cfg.window_size}) window cache slots, not positions"
    for name in OWN_WINDOWS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and 0 < value < context:
            return f"its {name}={value} limits attention by other means than the tree masks draftheads passes"
    return None


def context_length(config) -> int:
    """The longest sequence decoded exactly. Longrope switches every position's rotary frequencies once a
    forward reaches past the original context, and transformers' generate then recomputes the whole
    cache; a tree step straddling that point cannot match it, so decoding stops there."""
    context = getattr(config, "max_position_embeddings", None) or 1 << 30
    for params in _rope_parameter_sets(config):
        if params.get("rope_type") == "longrope" and params.get("original_max_position_embeddings"):
            context = min(context, params["original_max_position_embeddings"])
    return context


def _rope_parameter_sets(config) -> list[dict]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    # One set for the model, or one per layer type (Gemma-3: {"full_attention": {...}, "sliding_attention": {...}}).
    return [params] if "rope_type" in params else [p for p in params.values() if isinstance(p, dict)]


def logits_transform(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model's own forward applies to the output embedding's logits, as a function, or None."""
    cfg = model.config
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma-2, Gemma-3
    if cap:
        return lambda logits: torch.tanh(logits / cap) * cap
    scale = getattr(model, "logit_scale", None)  # Cohere: logits * logit_scale (a float attribute, not a Parameter)
    if isinstance(scale, (int, float)) and getattr(cfg, "logit_scale", None) is not None:
        return lambda logits: logits * scale
    divisor = getattr(cfg, "logits_scaling", None)  # Granite: logits / logits_scaling
    if divisor:
        return lambda logits: logits / divisor
    return None


@torch.inference_mode()
def probe(engine) -> str | None:
    """Why a tree step through `engine` (an engine.TorchEngine) does not reproduce its model, or None.

    Runs a 6-token prefill and a 4-node tree step through the engine's forward and logits, and the
    model's own forward (its own masks and cache) on the prefix plus each root-to-leaf path, and
    compares every logit. Sliding windows are shrunk for the duration so that they matter in 9 tokens."""
    model = engine.model
    try:
        with _shrunk_window(model.config, PROBE_WINDOW):
            got, want = _probe_logits(engine)
    except Exception as e:  # the model cannot run a tree step at all
        return f"its forward fails on a tree step ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
    tolerance = 1e-3 if engine.dtype == torch.float32 else 3e-2
    if not err <= tolerance:
        return f"a tree step through its forward does not reproduce the model's own logits (relative error {err:.1e})"
    return None


def _probe_logits(engine) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's logits for the probe's prefix and tree, and the model's own: both [6 + 4, vocab]."""
    model, dev, P = engine.model, engine.device, PROBE_PREFIX
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (P + PROBE_TREE.size,), generator=torch.Generator().manual_seed(0)).to(dev)
    prefix, cands = ids[:P], ids[P:]
    tt = PROBE_TREE.tensors(dev, engine.dtype)
    cache = TreeKVCache.for_model(model, P + PROBE_TREE.size)
    causal = torch.full((P, P), torch.finfo(engine.dtype).min, dtype=engine.dtype, device=dev).triu(1)
    hidden = torch.cat([engine._forward(cache, prefix, torch.arange(P, device=dev), causal, verify=False),
                        engine._forward(cache, cands, tt.depths + P, tt.tree_bias)])  # [P + nodes, hidden]
    got = engine.logits(hidden).float()  # [P + nodes, vocab]
    want = torch.empty_like(got)
    for path in PROBE_PATHS:
        seq = torch.cat([prefix, cands[path]])[None]  # [1, P + len(path)]
        own = model(input_ids=seq, use_cache=False).logits[0].float()  # [P + len(path), vocab]
        want[:P] = own[:P]
        want[[P + node for node in path]] = own[P:]
    return got, want


@contextlib.contextmanager
def _shrunk_window(config, window: int):
    """Temporarily give a sliding-window model a short window; both forwards read it from the config."""
    old = getattr(config, "sliding_window", None)
    shrink = SLIDING in attention_windows(config) and old > window
    if shrink:
        config.sliding_window = window
    try:
        yield
    finally:
        if shrink:
            config.sliding_window = old
