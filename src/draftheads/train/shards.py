"""The distilled set on disk: gzip'd JSONL shards, their hidden states, and a manifest.

    DIR/manifest.json                 backbone and fingerprint, command, seed, settings; per shard: records,
                                      assistant tokens, sources, sha256
    DIR/shard-00000.jsonl.gz          finished shards: small, versioned with the code
    DIR/features/shard-00000.safetensors   `hidden` [rows, hidden_size] fp16: every position of the shard's
                                      records in order (len(ids) rows each); a local cache, not versioned
    DIR/partial.jsonl, DIR/features/partial.bin   the shard being written

Kill safety: a record's hidden states are appended and fsynced before its JSONL line, and the line is
one write on an O_APPEND descriptor. On restart a torn line is cut, the hidden-state file is cut back to
the rows of the lines that made it, and the run goes on. A shard is finished by writing its features,
then the gzip'd records, then the manifest (each to a temporary name, then renamed), then removing
the partial files; a restart after a kill in between finishes it again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

# Settings that change what the data is: a resumed run must use the same ones.
FIXED_SETTINGS = ("backbone_fingerprint", "temperature", "top_p", "max_new_tokens", "max_prompt_tokens", "activations",
                  "kv_cache")
# What a manifest without the key was made with: sets distilled before int8 activations existed took x as it is, and
# before the float16 cache kept keys and values in float32
LEGACY_SETTINGS = {"activations": "float32", "kv_cache": "float32"}


def manifest_fingerprint(directory: str | Path) -> list[float] | None:
    """The backbone fingerprint a distilled directory's manifest records; None without a manifest (or one)."""
    man = Path(directory) / "manifest.json"
    return json.loads(man.read_text()).get("backbone_fingerprint") if man.exists() else None


def is_shard_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() or not p.suffix


class ShardWriter:
    """Appends distilled records (and their hidden states) to DIR, `shard_size` records a shard."""

    def __init__(self, directory: str | Path, shard_size: int, meta: dict):
        self.dir = Path(directory)
        (self.dir / "features").mkdir(parents=True, exist_ok=True)
        self.shard_size, self.meta = shard_size, meta
        self.manifest = self._check_manifest(meta)
        self._finish_interrupted()
        self.part = JsonlAppender(self.dir / "partial.jsonl")
        self.bin_path = self.dir / "features" / "partial.bin"
        rows = sum(r.get("rows", 0) for r in self.part.records)
        row_bytes = 2 * meta["hidden_size"]
        with open(self.bin_path, "ab") as f:  # cut rows of records whose line never made it
            f.truncate(min(os.path.getsize(self.bin_path), rows * row_bytes))
        if os.path.getsize(self.bin_path) != rows * row_bytes:
            raise UserError(f"{self.bin_path} is shorter than its records say: remove {self.dir / 'partial.jsonl'} "
                            "and its .bin to regenerate them")
        self.bin_fd = os.open(self.bin_path, os.O_WRONLY | os.O_APPEND)
        self.records = [r for _, recs, _ in iter_shards(self.dir, features=False) for r in recs]

    def _check_manifest(self, meta: dict) -> dict:
        path = self.dir / "manifest.json"
        if not path.exists():
            return {**meta, "shards": []}
        man = json.loads(path.read_text())
        for key in FIXED_SETTINGS:
            was, now = man.get(key, LEGACY_SETTINGS.get(key)), meta.get(key, LEGACY_SETTINGS.get(key))
            if was != now:
                raise UserError(f"{self.dir} was distilled with {key}={was!r}, this run has {now!r}: use another output "
                                "directory, or the same setting")
        man.update({k: v for k, v in meta.items() if k not in FIXED_SETTINGS})
        return man

    def _finish_interrupted(self) -> None:
        """A kill after a shard's gzip was renamed but before the partial files went: drop them now."""
        n = len(self.manifest["shards"])
        if (self.dir / shard_name(n)).exists():
            self._record_shard(n)
            _remove(self.dir / "partial.jsonl", self.dir / "features" / "partial.bin")

    def append(self, records: list[dict], hidden: list[torch.Tensor | None]) -> None:
        """records with `ids` and their hidden states [len(ids), H] (or None: `rows` 0)."""
        for rec, h in zip(records, hidden):
            if h is not None:
                assert h.shape == (len(rec["ids"]), self.meta["hidden_size"]), (h.shape, len(rec["ids"]))
                data = h.to(torch.float16).contiguous().numpy().tobytes()
                assert os.write(self.bin_fd, data) == len(data), "short write"
                os.fsync(self.bin_fd)
            rec["rows"] = 0 if h is None else h.shape[0]
        self.part.append(records)
        self.records += records
        if self._partial_count() >= self.shard_size:
            self.finish_shard()

    def _partial_count(self) -> int:
        return len(self.records) - sum(s["records"] for s in self.manifest["shards"])

    def finish_shard(self) -> None:
        """Turn the partial files into the next numbered shard (nothing to do when they are empty)."""
        n = len(self.manifest["shards"])
        recs = self.records[sum(s["records"] for s in self.manifest["shards"]):]
        if not recs:
            return
        rows = sum(r["rows"] for r in recs)
        if rows:
            raw = torch.frombuffer(bytearray(self.bin_path.read_bytes()), dtype=torch.float16)
            hidden = raw.view(rows, self.meta["hidden_size"])
            tmp = self.dir / "features" / f"{shard_name(n, '')}.tmp"
            save_file({"hidden": hidden}, str(tmp))
            os.chmod(tmp, 0o644)  # safetensors writes 0600
            os.replace(tmp, self.dir / "features" / shard_name(n, ".safetensors"))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()
        atomic_write(self.dir / shard_name(n), gzip.compress(body, mtime=0))
        self._record_shard(n)
        self.part.close()
        os.close(self.bin_fd)
        _remove(self.dir / "partial.jsonl", self.bin_path)
        self.part = JsonlAppender(self.dir / "partial.jsonl")
        self.bin_path.touch()
        self.bin_fd = os.open(self.bin_path, os.O_WRONLY | os.O_APPEND)

    def _record_shard(self, n: int) -> None:
        path = self.dir / shard_name(n)
        recs = [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
        self.manifest["shards"].append({
            "file": path.name, "records": len(recs), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "assistant_tokens": sum(len(r["ids"]) - r["prompt_len"] for r in recs),
            "sources": dict(sorted(Counter(r["source"] for r in recs).items()))})
        totals = Counter()
        for s in self.manifest["shards"]:
            totals.update(s["sources"])
        self.manifest["totals"] = {"records": sum(s["records"] for s in self.manifest["shards"]),
                                   "assistant_tokens": sum(s["assistant_tokens"] for s in self.manifest["shards"]),
                                   "sources": dict(sorted(totals.items()))}
        atomic_write(self.dir / "manifest.json", (json.dumps(self.manifest, indent=1) + "\n").encode())

    def close(self, finish: bool = True) -> None:
        """finish: the partial records become a (smaller) shard, so a stopped run leaves only shards."""
        if finish:
            self.finish_shard()
        self.part.close()
        os.close(self.bin_fd)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlAppender:
    """Append-only JSONL with whole-line atomic writes; reads back what earlier runs finished."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = self._recover()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @staticmethod
    def read(path: Path) -> list[dict]:
        """The whole lines of `path` (a torn last line, or a line being written, is left out)."""
        data = Path(path).read_bytes()
        out = []
        for line in data[:data.rfind(b"\n") + 1].splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # cannot happen with whole-line writes; tolerate hand edits
        return out

    def _recover(self) -> list[dict]:
        if not self.path.exists():
            return []
        size = self.path.stat().st_size
        end = self.path.read_bytes().rfind(b"\n") + 1
        if end < size:  # a torn last line from a kill mid-write: cut it off before appending
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        return self.read(self.path)

    def append(self, records: list[dict]) -> None:
        for r in records:
            line = (json.dumps(r, ensure_ascii=False) + "\n").encode()
            n = os.write(self.fd, line)  # O_APPEND + one write: the line lands whole or not at all
            assert n == len(line), "short write"
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def shard_name(n: int, suffix: str = ".jsonl.gz") -> str:
    return f"shard-{n:05d}{suffix}"


def _remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def distilled_dir(directory: str | Path) -> Path:
    """The directory `directory` as a distilled set to train from, or a UserError that says it is not one: a set holds
    a manifest (written with its first finished shard) or the partial shard of a run still short of one."""
    d = Path(directory)
    if not (d / "manifest.json").is_file() and not (d / "partial.jsonl").is_file():
        raise UserError(f"{directory} is not a distilled directory (no manifest.json, no partial.jsonl): make one with "
                        f"draftheads distill -o DIR, or pass a conversations JSONL file")
    return d


def iter_shards(directory: str | Path, features: bool = True, shards: int | None = None):
    """(name, records, hidden [rows, H] fp16 or None) for every finished shard in order, then the partial
    one; with `shards` = N only the first N finished shards. hidden is None when not asked for or not on this
    machine (features are a local cache)."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"distilled data directory not found: {directory}")
    if shards is not None and not (d / shard_name(shards - 1)).exists():
        have = sum(1 for _ in d.glob("shard-*.jsonl.gz"))
        raise UserError(f"{directory} has {have} finished shard(s), fewer than the {shards} asked for (--shards)")
    n = 0
    while (d / shard_name(n)).exists() and (shards is None or n < shards):
        recs = [json.loads(line) for line in gzip.decompress((d / shard_name(n)).read_bytes()).splitlines()]
        fpath = d / "features" / shard_name(n, ".safetensors")
        hidden = load_file(str(fpath))["hidden"] if features and fpath.exists() else None
        if hidden is not None and hidden.shape[0] != sum(r.get("rows", 0) for r in recs):
            hidden = None  # features of another version of this shard: recompute rather than misalign
        yield shard_name(n), recs, hidden
        n += 1
    part = d / "partial.jsonl"
    if part.exists() and shards is None:
        recs = JsonlAppender.read(part)
        hidden = None
        rows = sum(r.get("rows", 0) for r in recs)
        b = d / "features" / "partial.bin"
        man = d / "manifest.json"
        size = json.loads(man.read_text()).get("hidden_size") if man.exists() else None
        if features and rows and size and b.exists() and b.stat().st_size >= rows * size * 2:
            # A run still writing may have appended rows whose line is not there yet: read only ours.
            raw = torch.frombuffer(bytearray(b.read_bytes()[:rows * size * 2]), dtype=torch.float16)
            hidden = raw.view(rows, size)
        yield "partial", recs, hidden


def fill_features(directory: str | Path, hidden_of, batch_tokens: int = 4096, progress: bool = True,
                  shards: int | None = None) -> int:
    """Compute the features of every finished shard (or of the first `shards`) that lacks them here (a fresh
    clone: features are a local cache). hidden_of(list of ids [T_i]) -> list of hidden states [T_i, H].
    Records go in batches of similar length, up to `batch_tokens` padded positions. Each shard is written
    whole and atomically, so a killed pass resumes at the first shard still missing. Returns how many shards
    were computed."""
    from tqdm.auto import tqdm

    from safetensors import safe_open

    def stored_rows(n: int) -> int | None:  # the rows a shard's features file holds, read from its header only
        path = d / "features" / shard_name(n, ".safetensors")
        if not path.exists():
            return None
        with safe_open(str(path), "pt") as f:
            return f.get_slice("hidden").get_shape()[0]

    d = Path(directory)
    # As iter_shards: a features file of another version of the shard (other row count) is recomputed.
    todo = [(n, recs) for n, (name, recs, _) in enumerate(iter_shards(d, features=False, shards=shards))
            if name != "partial" and 0 != sum(r.get("rows", 0) for r in recs) != stored_rows(n)]
    size = json.loads((d / "manifest.json").read_text())["hidden_size"]
    bar = tqdm(total=sum(r["rows"] for _, recs in todo for r in recs), desc="features", unit="tok",
               unit_scale=True, disable=not progress or not todo)
    for n, recs in todo:
        out: dict[int, torch.Tensor] = {}
        order = sorted((i for i, r in enumerate(recs) if r["rows"]), key=lambda i: len(recs[i]["ids"]))
        while order:
            k = 1  # ascending lengths: the k-th record is the batch's longest
            while k < len(order) and len(recs[order[k]]["ids"]) * (k + 1) <= batch_tokens:
                k += 1
            idx, order = order[:k], order[k:]
            for i, h in zip(idx, hidden_of([torch.tensor(recs[i]["ids"]) for i in idx])):
                assert h.shape == (recs[i]["rows"], size), (h.shape, recs[i]["rows"], size)
                out[i] = h.to("cpu", torch.float16)
            bar.update(sum(recs[i]["rows"] for i in idx))
        tmp = d / "features" / shard_name(n, ".tmp")
        tmp.parent.mkdir(exist_ok=True)
        save_file({"hidden": torch.cat([out[i] for i in sorted(out)])}, str(tmp))
        os.chmod(tmp, 0o644)  # safetensors writes 0600
        os.replace(tmp, d / "features" / shard_name(n, ".safetensors"))
    bar.close()
    return len(todo)


def read_distilled(directory: str | Path, features: bool = True,
                   shards: int | None = None) -> tuple[list[dict], list[torch.Tensor | None]]:
    """Every record of a distilled directory (or of its first `shards` finished shards) and, per record, its
    stored hidden states [len(ids), H] or None."""
    records, hidden = [], []
    for _, recs, h in iter_shards(directory, features, shards):
        row = 0
        for r in recs:
            n = r.get("rows", 0)
            hidden.append(h[row:row + n] if h is not None and n else None)
            row += n
            records.append(r)
    return records, hidden
