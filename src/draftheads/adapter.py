"""Medusa-2's LoRA adapter after training: merging it into the backbone, and telling the tuned
backbone from the original.

Medusa-2 heads (`HeadsConfig.adapter` set) were trained together with a LoRA adapter that changed the
backbone, so they draft from the TUNED backbone's hidden states. The loop's lean forward reads the
model's own nn.Linear weights, so the adapter is merged into them (W + scale * B A) before it runs.

The tuned fingerprint. LoRA normally leaves the output embedding alone, so the output-embedding
fingerprint every heads directory records cannot tell the tuned backbone from the original. Training
therefore also records, for the 32 weights the adapter changed most (over all adapted matrices), the
weight's name, its index, its tuned value and the change. A backbone is the tuned one when its weights
there lie closer to the tuned values than to the original ones (tuned - change); an adapter that
changed nothing (LoRA's B = 0 at initialisation) makes both the same, and either backbone passes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .errors import UserError

POINTS = 32
_PEFT_PREFIX = "base_model.model."


def lora_changes(model: torch.nn.Module, points: int = POINTS) -> list[dict]:
    """The `points` largest weight changes of the LoRA layers peft injected into `model` (before merging):
    [{"weight": parameter name in the merged model, "index": [row, col], "delta": change}], largest first."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer) or not getattr(mod, "lora_A", None):
            continue
        weight = mod.get_base_layer().weight
        for adapter in mod.lora_A:
            delta = mod.get_delta_weight(adapter).detach().float()  # [out, in], oriented as the weight
            if delta.shape != weight.shape or delta.dim() != 2:
                continue
            top = delta.abs().flatten().topk(min(points, delta.numel()))
            for v, i in zip(top.values.tolist(), top.indices.tolist()):
                r, c = divmod(i, delta.shape[1])
                found.append((v, name.removeprefix(_PEFT_PREFIX) + ".weight", r, c, float(delta[r, c])))
    found.sort(key=lambda x: -x[0])
    return [{"weight": n, "index": [r, c], "delta": d} for _, n, r, c, d in found[:points]]


def tuned_fingerprint(merged: torch.nn.Module, changes: list[dict]) -> list[dict]:
    """`changes` (from lora_changes) with the merged model's values there: the tuned fingerprint."""
    return [{**e, "tuned": float(_weight_at(merged, e))} for e in changes]


def _weight_at(model, entry) -> float | None:
    try:
        w = model.get_parameter(entry["weight"])
    except AttributeError:
        return None
    r, c = entry["index"]
    if w.dim() != 2 or r >= w.shape[0] or c >= w.shape[1]:
        return None
    return float(w[r, c].detach())


def tuned_verdict(model: torch.nn.Module, fingerprint: list[dict]) -> str:
    """"tuned", "untuned" (the original backbone) or "other" (neither) for a plain or merged model."""
    if not fingerprint:
        return "tuned"
    closer = far = 0
    for e in fingerprint:
        x = _weight_at(model, e)
        if x is None:
            return "other"
        t, d = e["tuned"], e["delta"]
        to_tuned, to_original = abs(x - t), abs(x - (t - d))
        # fp16/bf16 copies round each weight by up to ~0.4%: the tolerance of output_embedding_fingerprint
        far += min(to_tuned, to_original) > 2e-3 + 2e-2 * abs(t)
        closer += to_tuned <= to_original
    if far > len(fingerprint) // 4:
        return "other"
    return "tuned" if closer >= 0.75 * len(fingerprint) else "untuned"


def refusal(cfg, verdict: str, where) -> str:
    """What a user is told when Medusa-2 heads meet a backbone that is not their tuned one."""
    fix = (f"load them with draftheads.load / --heads {where}, which merges their adapter ({cfg.adapter}, relative "
           "to the heads), or pass the merged weights (`train --merge`) as the backbone" if cfg.adapter else
           "pass the tuned backbone they were exported with")
    if verdict == "untuned":
        return (f"heads in {where} are Medusa-2 heads: they were trained together with a LoRA adapter that changed "
                f"the backbone, and this is the original (untuned) backbone {cfg.backbone!r}: {fix}")
    return (f"heads in {where} are Medusa-2 heads for a LoRA-tuned {cfg.backbone!r}, and this backbone's weights match "
            f"neither the tuned nor the original model: {fix}")


def adapter_dir(heads_dir: str | Path, adapter: str) -> Path:
    return (Path(heads_dir).expanduser() / adapter).resolve()


def merge_adapter(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """`model` with the peft LoRA adapter in `directory` merged into its weights (in place; returned)."""
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(model, str(directory), is_trainable=False).merge_and_unload()
    except Exception as e:  # a torn file, another architecture's module names, ...
        raise UserError(f"cannot apply the LoRA adapter {directory}: {str(e).splitlines()[0]}") from None
    return merged.eval().requires_grad_(False)


def prepare_backbone(bb, heads_dir: str | Path, raw: dict):
    """The backbone Medusa-2 heads draft from: `bb` as it is when it already carries their adapter (the
    merged weights from `train --merge`), else `bb` with the adapter merged in. Says which on stderr:
    either way the model is no longer the original one."""
    from .backbone import Backbone

    fp = raw.get("tuned_fingerprint") or []
    where = adapter_dir(heads_dir, raw["adapter"])
    if any(e.get("delta") for e in fp) and tuned_verdict(bb.model, fp) == "tuned":
        _note(f"the backbone {bb.name} already carries the Medusa-2 adapter of {heads_dir} (merged weights)")
        return bb
    if not (where / "adapter_config.json").exists():
        raise UserError(f"heads in {heads_dir} are Medusa-2 heads and need the LoRA adapter they were trained with, "
                        f"{where}, which is missing (or pass the merged weights from `train --merge` as the backbone)")
    model = merge_adapter(bb.model, where)
    _note(f"Medusa-2 heads: the backbone {bb.name} was changed by the LoRA adapter {where} (merged on load)")
    return Backbone(model=model, tokenizer=bb.tokenizer, name=bb.name)


def _note(what: str) -> None:
    print(f"draftheads: note: {what}; its replies can differ from the original model's (Medusa-2 is not lossless "
          "with respect to it; `draftheads compare` measures by how much)", file=sys.stderr)


def save_backbone(model: torch.nn.Module, tokenizer, directory: str | Path) -> Path:
    """A Hugging Face model directory (weights, config, tokenizer), written beside `directory` and renamed
    into place, so a kill never leaves half a model."""
    target = Path(directory).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
