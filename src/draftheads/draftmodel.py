"""A backbone with its heads and tree, ready to generate: the object `draftheads.load` returns.

Owns what turns the loop's token steps into a reply: chat templates, stop conditions (EOS, stop
strings, max_new_tokens, the context limit), incremental text for streaming, and the statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .acceptance import SamplingConfig
from .backbone import Backbone, chat_ids, load_backbone
from .errors import UserError
from .generate import Decoder, Stats
from .heads import load_heads
from .heads.checkpoint import read_config
from .tree import Tree, load_tree

DEFAULT_HEADS_DIR = Path(__file__).parent / "default_heads"
DEFAULT_TREE = "medusa16"  # used when the heads carry no calibrated tree


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
    def __init__(self, backbone: Backbone, heads=None, tree: Tree | None = None):
        self.backbone, self.tokenizer, self.heads = backbone.model, backbone.tokenizer, heads
        self.backbone_name = backbone.name
        self.tree = tree
        self.decoder = Decoder(self.backbone, heads, tree)
        eos = self.backbone.generation_config.eos_token_id if self.backbone.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in eos + [self.tokenizer.eos_token_id] if e is not None}

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] != 1:
                raise UserError("batch size > 1 is not supported: pass one sequence of ids")
            return prompt.reshape(-1).tolist()
        if isinstance(prompt, str) and not prompt.strip():
            raise UserError("the prompt is empty")
        return chat_ids(self.tokenizer, prompt)

    def iter_generate(self, prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                      top_k: int = 0, acceptance: str = "greedy", tree=None, stop=None, seed: int | None = None,
                      typical_epsilon: float = 0.09, typical_delta: float = 0.3) -> Iterator[Chunk]:
        """Chunks of new text as the loop accepts tokens; the last chunk carries the Result."""
        if max_new_tokens < 1:
            raise UserError("max_new_tokens must be at least 1")
        sp = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, acceptance=acceptance, seed=seed,
                            typical_epsilon=typical_epsilon, typical_delta=typical_delta)
        if tree is not None and self.heads is not None:
            tree = load_tree(tree, self.heads.cfg.num_heads)
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        ids = self.prompt_ids(prompt)
        # The whole sequence stays within the context window.
        room = self.decoder.context - len(ids)
        limit, limit_reason = (max_new_tokens, "length") if max_new_tokens <= room else (room, "context")
        stats, tokens, text, sent, finish = Stats(), [], "", 0, None
        start = time.perf_counter()
        for step in self.decoder.steps(ids, limit, sp, stats, tree):
            for t in step:
                if t in self.eos_ids:
                    finish = "stop"
                    break
                tokens.append(t)
                if len(tokens) >= limit:
                    finish = limit_reason
                    break
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(s, max(sent - len(s), 0)) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                while tokens and any(s in self.tokenizer.decode(tokens[:-1], skip_special_tokens=True) for s in stops):
                    tokens.pop()
            # Hold back a torn UTF-8 character and anything that may be the start of a stop string.
            hold = 0 if finish else _holdback(text, stops)
            if len(text) - hold > sent:
                yield Chunk(text[sent:len(text) - hold])
                sent = len(text) - hold
            if finish:
                break
        stats.new_tokens, stats.total_s = len(tokens), time.perf_counter() - start
        yield Chunk(text[sent:], Result(tokens, text, stats, finish))

    def generate(self, prompt, **kwargs) -> Result:
        for chunk in self.iter_generate(prompt, **kwargs):
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("iter_generate ended without a result")

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        for chunk in self.iter_generate(prompt, **kwargs):
            if chunk.text:
                yield chunk.text


def _holdback(text: str, stops: list[str]) -> int:
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def load(heads="default", backbone: str | None = None, device: str = "cpu", dtype=None, tree=None) -> DraftModel:
    """Load a backbone and its heads. heads: "default" (the heads shipped for the default backbone),
    a heads directory, or None (plain decoding). backbone: None means the one the heads name."""
    if heads == "default":
        if not (DEFAULT_HEADS_DIR / "config.json").exists():
            raise UserError("no default heads are shipped in this version: pass heads=<directory> or heads=None")
        heads = DEFAULT_HEADS_DIR
    if heads is not None and not Path(heads).expanduser().is_dir():
        raise UserError(f"heads directory not found: {heads}")
    raw = read_config(Path(heads).expanduser()) if heads is not None else {}
    if backbone is None:
        backbone = raw.get("backbone") or raw.get("base_model_name_or_path") or None
    bb = load_backbone(backbone, device=device, dtype=dtype)
    head_module = None
    if heads is not None:
        head_module = load_heads(heads, bb.model).to(device=bb.model.device, dtype=bb.model.dtype)
        head_module.attach(bb.model).eval()
        tree = load_tree(tree or head_module.cfg.tree or DEFAULT_TREE, head_module.cfg.num_heads)
    return DraftModel(bb, head_module, tree)
