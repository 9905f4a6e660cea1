"""Export heads to the layouts serving engines load; `checkpoint.load_heads` reads them back.

- `vllm`: vLLM's Medusa draft model (`config.json` with `model_type: "medusa"`, `model.safetensors`
  with `blocks.{h}.layers.{l}.weight|bias`, `lm_heads.{h}.weight`, `token_map` under VocabTrim). A
  shared LM head becomes `original_lm_head: true` with the backbone's weight as `lm_heads.0.weight`,
  so that export needs the backbone.
- `medusa`: FasterDecoding's layout (`medusa_lm_head.safetensors`, keys `{h}.{l}.linear.weight|bias`
  and `{h}.{L}.weight`; config `medusa_num_heads`, `medusa_num_layers`, `base_model_name_or_path`).
  TensorRT-LLM's converter reads the same file.
- `tgi`: TGI reads the `medusa` layout (MedusaHeadV1 per-head, MedusaHeadV2 shared), with stricter
  rules: the shared form needs exactly one layer, and `base_model_name_or_path` must be a name or path
  TGI can load, since TGI loads the backbone from it.

Only the vLLM layout can carry a VocabTrim id map; the others refuse trimmed heads rather than write
heads that draft differently. Hydra heads have no engine layout at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError
from .checkpoint import _atomic_write, read_config
from .medusa import MedusaHeads

FORMATS = ("vllm", "medusa", "tgi")


def check_exportable(heads_dir: str | Path) -> dict:
    """Refuse head types no engine runs before anything is loaded, with a message that says so."""
    raw = read_config(Path(heads_dir).expanduser())
    head_type = raw.get("head_type", "medusa")
    if head_type != "medusa":
        raise UserError(f"{head_type} heads have no serving-engine support (vLLM, TGI and TensorRT-LLM run Medusa "
                        "heads only): serve them with `draftheads serve`")
    return raw


def export_heads(heads: MedusaHeads, out: str | Path, to: str, backbone_weight: torch.Tensor | None = None) -> Path:
    """Write `heads` to `out` in layout `to`. backbone_weight: the backbone's full output embedding
    [vocab, hidden], needed only for shared-LM-head heads going to vLLM."""
    if to not in FORMATS:
        raise UserError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    cfg = heads.cfg
    state = {k: (v.float() if v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in heads.state_dict().items()}
    # What engines ignore but our import restores: the wrong-backbone check and the calibrated tree (with the lookup
    # decision it was chosen beside and the heads' own tree apart, which `load` picks between).
    ours = {"backbone": cfg.backbone, "backbone_fingerprint": cfg.backbone_fingerprint, "tree": cfg.tree,
            "lookup": cfg.lookup, "heads_alone": cfg.heads_alone, "exported_by": "draftheads"}
    if cfg.tuned_fingerprint:  # Medusa-2 heads: refuse the untuned backbone after a round trip too
        ours["tuned_fingerprint"] = cfg.tuned_fingerprint
    if to == "vllm":
        tensors, config = _vllm(heads, state, backbone_weight)
    else:
        tensors, config = _medusa(heads, state, to)
    config["draftheads"] = ours
    out.mkdir(parents=True, exist_ok=True)
    name = "model.safetensors" if to == "vllm" else "medusa_lm_head.safetensors"
    _atomic_write(out / name, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=1) + "\n"))
    return out


def _vllm(heads: MedusaHeads, state: dict, backbone_weight) -> tuple[dict, dict]:
    cfg = heads.cfg
    tensors = {}
    for h in range(cfg.num_heads):
        for l in range(cfg.num_layers):
            tensors[f"blocks.{h}.layers.{l}.weight"] = state[f"blocks.{h}.{l}.linear.weight"]
            tensors[f"blocks.{h}.layers.{l}.bias"] = state[f"blocks.{h}.{l}.linear.bias"]
        if cfg.lm_head == "own":
            tensors[f"lm_heads.{h}.weight"] = state[f"lm_heads.{h}.weight"]
    if cfg.lm_head == "shared":
        if backbone_weight is None:
            raise UserError("heads with a shared LM head need the backbone for a vLLM export (vLLM reads the "
                            "shared head from the draft checkpoint): pass --backbone")
        w = backbone_weight.detach().float().cpu()
        if tuple(w.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise UserError(f"backbone output embedding is {tuple(w.shape)}, heads expect "
                            f"({cfg.vocab_size}, {cfg.hidden_size})")
        # vLLM slices a full-vocabulary lm_heads.0.weight by token_map itself; store only the kept rows.
        tensors["lm_heads.0.weight"] = (w[state["vocab_map"]] if cfg.trimmed_vocab else w).contiguous()
    if cfg.trimmed_vocab:
        tensors["token_map"] = state["vocab_map"].long()
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "num_heads": cfg.num_heads,
              "num_hidden_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
              "truncated_vocab_size": cfg.trimmed_vocab or cfg.vocab_size,
              "medusa_fc_bias": True,  # our residual blocks have a bias; vLLM's default is none
              "original_lm_head": cfg.lm_head == "shared", "max_paths": 64, "topk": 10}
    return tensors, config


def _medusa(heads: MedusaHeads, state: dict, to: str) -> tuple[dict, dict]:
    cfg = heads.cfg
    if cfg.trimmed_vocab:
        raise UserError(f"the {to} layout cannot hold VocabTrim heads (no id map; their LM heads cover "
                        f"{cfg.trimmed_vocab} of {cfg.vocab_size} tokens): export --to vllm, which has token_map")
    if to == "tgi" and cfg.lm_head == "shared" and cfg.num_layers != 1:
        raise UserError(f"TGI runs shared-LM-head Medusa heads only with one layer per head; these have {cfg.num_layers}")
    if to == "tgi" and not cfg.backbone:
        raise UserError("TGI loads the backbone from base_model_name_or_path, but these heads do not record "
                        "their backbone")
    L = cfg.num_layers
    tensors = {}
    for h in range(cfg.num_heads):
        for l in range(L):
            tensors[f"{h}.{l}.linear.weight"] = state[f"blocks.{h}.{l}.linear.weight"]
            tensors[f"{h}.{l}.linear.bias"] = state[f"blocks.{h}.{l}.linear.bias"]
        if cfg.lm_head == "own":
            tensors[f"{h}.{L}.weight"] = state[f"lm_heads.{h}.weight"]
    config = {"medusa_num_heads": cfg.num_heads, "medusa_num_layers": L, "base_model_name_or_path": cfg.backbone,
              "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size}
    if cfg.lm_head == "shared":
        config["version"] = "2"  # Medusa's marker for heads without their own LM heads
    return tensors, config
