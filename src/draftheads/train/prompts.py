"""Prompt sources for self-distillation: the user's files (JSON list, JSONL, plain text) with the
prompt field found automatically, or named with `field`.

Auto-detected record layouts (those of ../shared/data and the usual instruction sets):
`turns[0]` (MT-bench style), `question`, `instruction` (+ `input`, or `instances[0].input`),
`prompt`, `messages`/`conversations` (first user turn), and bare JSON strings.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

_AUTO_FIELDS = ("turns", "question", "instruction", "prompt", "messages", "conversations", "text")


def _first_user(turns) -> str | None:
    for m in turns:
        if isinstance(m, str):
            return m
        if isinstance(m, dict) and m.get("role", m.get("from")) in ("user", "human"):
            return m.get("content", m.get("value"))
    return None


def _extract(rec, field: str | None) -> str | None:
    """The prompt text of one record, or None when the record has none."""
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return None
    if field is not None:
        if field not in rec:
            return None
        val = rec[field]
        return _first_user(val) if isinstance(val, list) else (val if isinstance(val, str) else None)
    for key in _AUTO_FIELDS:
        if key not in rec:
            continue
        val = rec[key]
        if key in ("turns", "messages", "conversations") and isinstance(val, list):
            return _first_user(val)
        if key == "instruction" and isinstance(val, str):
            extra = rec.get("input") or ""
            if not extra and isinstance(rec.get("instances"), list) and rec["instances"]:
                extra = (rec["instances"][0] or {}).get("input") or ""
            return f"{val}\n\n{extra}" if str(extra).strip() else val
        if isinstance(val, str):
            return val
    return None


def _records(path: Path) -> list:
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"prompt file is empty: {path}")
    if stripped[0] == "[":  # one JSON document holding a list
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records")
        return data
    lines = [ln for ln in text.split("\n") if ln.strip()]  # not splitlines(): JSON strings may hold U+2028
    if path.suffix in (".jsonl", ".json") or lines[0].lstrip()[:1] in ("{", '"'):
        out = []
        for i, ln in enumerate(lines):
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{i + 1}: not a JSON line (use a .txt file for plain prompts)") from None
        return out
    return lines  # plain text, one prompt a line


def load_prompts(path: str | Path, field: str | None = None) -> list[str]:
    """Prompts of a file in file order, stripped, empty ones dropped (duplicates kept; the planner dedups)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"prompt file not found: {path}")
    recs = _records(p)
    prompts = [_extract(r, field) for r in recs]
    prompts = [s.strip() for s in prompts if isinstance(s, str) and s.strip()]
    if not prompts:
        what = f"has the field {field!r}" if field else f"is a string or has a prompt field ({', '.join(_AUTO_FIELDS)})"
        raise UserError(f"{path}: no prompts found: no record {what}")
    return prompts


def dedup(prompts: list[str], seen: set[str] | None = None) -> list[str]:
    """Drop repeats (compared after collapsing whitespace and case), keeping first occurrences."""
    seen = set() if seen is None else seen
    out = []
    for s in prompts:
        key = norm(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def norm(s: str) -> str:
    return " ".join(s.lower().split())
