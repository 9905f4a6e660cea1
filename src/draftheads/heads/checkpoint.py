"""Heads on disk.

Native: a directory with `config.json` (HeadsConfig) and `model.safetensors`
(`blocks.{h}.{l}.linear.weight|bias`, `lm_heads.{h}.weight`, `vocab_map`).

Also read: the official Medusa layout (`medusa_lm_head.safetensors` or `.pt`, keys
`{h}.{l}.linear.weight|bias` and `{h}.{L}.weight`, config `medusa_num_heads`, `medusa_num_layers`,
`base_model_name_or_path`), which is also TGI's layout, and vLLM's Medusa layout (`config.json` with
`model_type: "medusa"`, keys `blocks.{h}.layers.{l}.weight|bias`, `lm_heads.{h}.weight`, optional
`token_map`). `.pt`/`.bin` files load with `torch.load(weights_only=True)`, never as pickle.
Exporting to those layouts lives in `export.py`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..backbone import fingerprints_match, output_embedding_fingerprint, output_embedding_shape
from ..errors import UserError
from .hydra import HydraHeads
from .medusa import HeadsConfig, MedusaHeads


def build_heads(cfg: HeadsConfig):
    """Untrained heads of the config's type."""
    return HydraHeads(cfg) if cfg.head_type in ("hydra", "hydra++") else MedusaHeads(cfg)


def save_heads(heads: MedusaHeads, directory: str | Path) -> Path:
    """Write atomically: files go to a temporary name and are renamed, so a kill never leaves a torn file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    _atomic_write(directory / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json",
                  lambda p: Path(p).write_text(json.dumps(heads.cfg.to_dict(), indent=1) + "\n"))
    return directory


def _atomic_write(path: Path, write) -> None:
    """write(tmp) then rename over `path`, with the mode a new file normally gets (0644 under the usual
    umask): mkstemp and safetensors create 0600 files, which other users could not read."""
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies here
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise UserError(f"{directory} holds no config.json: not a heads directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def load_heads(path: str | Path, backbone=None) -> MedusaHeads:
    """Heads from a native or official-Medusa directory. With a backbone, check they belong to it."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise UserError(f"heads directory not found: {path}")
    raw = read_config(directory)
    if raw.get("model_type") == "medusa":  # vLLM's layout; checked first, its config may also name medusa_num_heads
        heads = _load_vllm_medusa(directory, raw)
    elif "medusa_num_heads" in raw or not (directory / "model.safetensors").exists():
        heads = _load_official_medusa(directory, raw)
    else:
        heads = build_heads(HeadsConfig.from_dict(raw))
        try:
            state = load_file(directory / "model.safetensors")
        except Exception as e:  # a torn or foreign file
            raise UserError(f"cannot read {directory / 'model.safetensors'}: {e}") from None
        _load_state(heads, state, directory)
    if backbone is not None:
        check_backbone(heads.cfg, backbone, directory)
        heads.attach(backbone)
    return heads


def _load_state(heads: MedusaHeads, state: dict, where) -> None:
    try:
        heads.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"weights in {where} do not match their config: {str(e).splitlines()[0]}") from None


def check_backbone(cfg: HeadsConfig, backbone, where) -> None:
    shape = output_embedding_shape(backbone)  # (vocab, hidden)
    if cfg.lm_head == "shared" and not cfg.vocab_size:  # official "version 2" heads do not record it
        cfg.vocab_size = shape[0]
    if (cfg.vocab_size, cfg.hidden_size) != shape:
        raise UserError(f"heads in {where} are for a backbone with vocab {cfg.vocab_size} and hidden size "
                        f"{cfg.hidden_size}, this one has {shape[0]} and {shape[1]} ({cfg.backbone or 'unknown'})")
    if cfg.tuned_fingerprint:  # Medusa-2: the backbone must carry the adapter the heads were trained with
        from ..adapter import refusal, tuned_verdict

        verdict = tuned_verdict(backbone, cfg.tuned_fingerprint)
        if verdict != "tuned":
            raise UserError(refusal(cfg, verdict, where))
    if cfg.backbone_fingerprint and not fingerprints_match(cfg.backbone_fingerprint, output_embedding_fingerprint(backbone)):
        raise UserError(f"heads in {where} were trained for backbone {cfg.backbone!r}, whose output embedding "
                        "differs from this backbone's: load the backbone they were trained on")


def _load_official_medusa(directory: Path, raw: dict) -> MedusaHeads:
    for name in ("medusa_lm_head.safetensors", "medusa_lm_head.pt"):
        if (directory / name).exists():
            file = directory / name
            break
    else:
        raise UserError(f"{directory} has neither model.safetensors nor medusa_lm_head.safetensors/.pt")
    try:
        state = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {file} safely: {str(e).splitlines()[0]}") from None
    state = {k.removeprefix("medusa_head."): v for k, v in state.items()}
    try:
        cfg, native = _official_to_native(state, raw)
    except (KeyError, ValueError, IndexError, AttributeError) as e:  # a key missing or not "head.layer.name"
        raise UserError(f"{file} does not have the official Medusa layout (<head>.<layer>.linear.weight, "
                        f"<head>.<layers>.weight): {type(e).__name__} {e}") from None
    _restore_identity(cfg, raw)
    heads = MedusaHeads(cfg)
    _load_state(heads, native, file)
    return heads


def _official_to_native(state: dict, raw: dict) -> tuple[HeadsConfig, dict]:
    """Official Medusa keys ("<head>.<layer>.linear.weight"; "<head>.<layers>.weight" for a head's own LM
    head) -> our config and state dict. Raises KeyError/ValueError for anything else."""
    layers = int(raw.get("medusa_num_layers", 1))
    # The official config sometimes under-reports the heads (Medusa's own "TODO: fix the uploaded
    # config"): trust the weights.
    heads_in_file = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"(\d+)\.", k)))
    w0 = state["0.0.linear.weight"]
    own = f"0.{layers}.weight" in state
    vocab = state[f"0.{layers}.weight"].shape[0] if own else int(raw.get("vocab_size", 0))
    cfg = HeadsConfig(num_heads=heads_in_file, hidden_size=w0.shape[0], vocab_size=vocab, num_layers=layers,
                      lm_head="own" if own else "shared", backbone=raw.get("base_model_name_or_path", ""))
    native = {}
    for key, value in state.items():
        h, rest = key.split(".", 1)
        l, tail = rest.split(".", 1)
        native[f"lm_heads.{h}.{tail}" if int(l) == layers else f"blocks.{h}.{l}.{tail}"] = value.float()
    return cfg, native


def _restore_identity(cfg: HeadsConfig, raw: dict) -> None:
    """Our exports keep the backbone identity (and tree) under a "draftheads" key that engines ignore,
    so a round trip still refuses the wrong backbone."""
    ours = raw.get("draftheads") or {}
    if not isinstance(ours, dict):
        return
    cfg.backbone = ours.get("backbone", cfg.backbone) or cfg.backbone
    cfg.backbone_fingerprint = list(ours.get("backbone_fingerprint") or cfg.backbone_fingerprint)
    cfg.tree = ours.get("tree", cfg.tree)
    cfg.lookup, cfg.heads_alone = ours.get("lookup", cfg.lookup), ours.get("heads_alone", cfg.heads_alone)
    HeadsConfig.from_dict(cfg.to_dict())  # what was restored is checked as a native config is
    cfg.tuned_fingerprint = list(ours.get("tuned_fingerprint") or cfg.tuned_fingerprint)  # Medusa-2 exports


def _load_vllm_medusa(directory: Path, raw: dict) -> MedusaHeads:
    """vLLM's Medusa draft model. Config keys whose names hold "num" and "heads"/"layers" count as
    num_heads/num_hidden_layers, as vLLM's own MedusaConfig reads them."""
    def pick(exact, word, default=None):
        if exact in raw:  # prefer the exact name; the rename rule also matches e.g. num_attention_heads
            return int(raw[exact])
        for k, v in raw.items():
            if "num" in k and word in k:
                return int(v)
        return default

    num_heads, layers = pick("num_heads", "heads"), pick("num_hidden_layers", "layers", 1)
    if "num_lookahead_tokens" in raw and num_heads is None:
        num_heads = int(raw["num_lookahead_tokens"])
    try:
        hidden, vocab = int(raw["hidden_size"]), int(raw["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{directory / 'config.json'}: a vLLM Medusa config needs hidden_size and vocab_size") from None
    if num_heads is None:
        raise UserError(f"{directory / 'config.json'}: a vLLM Medusa config needs num_heads")
    state = {}
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin")) or sorted(directory.glob("*.pt"))
    if not files:
        raise UserError(f"{directory} holds no .safetensors/.bin weights for its vLLM Medusa config")
    for file in files:
        try:
            part = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read {file} safely: {str(e).splitlines()[0]}") from None
        state.update({k.removeprefix("medusa_heads."): v for k, v in part.items()})
    truncated = int(raw.get("truncated_vocab_size") or vocab)
    trimmed = truncated if truncated < vocab else None
    if trimmed and "token_map" not in state:
        raise UserError(f"{directory}: truncated_vocab_size {truncated} < vocab_size {vocab} but there is no token_map")
    shared = bool(raw.get("original_lm_head", False))
    cfg = HeadsConfig(num_heads=num_heads, hidden_size=hidden, vocab_size=vocab, num_layers=layers,
                      lm_head="shared" if shared else "own", trimmed_vocab=trimmed)
    _restore_identity(cfg, raw)
    native = {}
    for h in range(num_heads):
        for l in range(layers):
            w = state.get(f"blocks.{h}.layers.{l}.weight")
            if w is None:
                raise UserError(f"{directory}: weights lack blocks.{h}.layers.{l}.weight")
            native[f"blocks.{h}.{l}.linear.weight"] = w.float()
            # medusa_fc_bias false (vLLM's default) means a bias-free block: a zero bias is the same.
            b = torch.zeros(hidden)
            if raw.get("medusa_fc_bias", False):
                b = state.get(f"blocks.{h}.layers.{l}.bias")
                if b is None:
                    raise UserError(f"{directory}: medusa_fc_bias is set but weights lack blocks.{h}.layers.{l}.bias")
            native[f"blocks.{h}.{l}.linear.bias"] = b.float()
        if not shared:  # a shared head is the backbone's own; attach() takes it from the backbone
            w = state.get(f"lm_heads.{h}.weight")
            if w is None:
                raise UserError(f"{directory}: weights lack lm_heads.{h}.weight")
            native[f"lm_heads.{h}.weight"] = (w[state["token_map"]] if trimmed and w.shape[0] > truncated else w).float()
    if trimmed:
        native["vocab_map"] = state["token_map"].long()
    heads = MedusaHeads(cfg)
    _load_state(heads, native, directory)
    return heads
