"""Reading a prompt set: MT-bench / Spec-Bench question files (JSONL with `question_id`, `category`,
`turns`) or a plain prompt file (JSON list, JSONL of strings or of objects with a `prompt`,
`instruction`, `question` or `turns` field, chat records with `messages` (what `draftheads distill` writes:
the user turns), or one prompt per text line)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

PROMPT_FIELDS = ("prompt", "instruction", "question", "text", "input")
DATA_DIR = Path(__file__).parent / "data"
# Question sets shipped in the package (data/README.md: origins and licences), usable by name.
SHIPPED = {"vicuna": "vicuna_bench_question.jsonl", "copying": "copying_bench_question.jsonl"}


@dataclass
class Question:
    qid: str
    category: str
    turns: list[str]


def _record(obj, i: int) -> Question | None:
    if isinstance(obj, str):
        return Question(str(i), "default", [obj]) if obj.strip() else None
    if not isinstance(obj, dict):
        return None
    turns, messages = obj.get("turns"), obj.get("messages")
    if isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns):
        turns = [t for t in turns if t.strip()]
    elif isinstance(messages, list):  # a chat record (distill's output): its user turns
        turns = [m["content"] for m in messages if isinstance(m, dict) and m.get("role") == "user"
                 and isinstance(m.get("content"), str) and m["content"].strip()]
    else:
        text = next((obj[f] for f in PROMPT_FIELDS if isinstance(obj.get(f), str) and obj[f].strip()), None)
        if text is None:
            return None
        # Instruction datasets put the task's material in a separate field: it belongs to the prompt.
        extra = obj.get("input") if "instruction" in obj else None
        turns = [text + ("\n\n" + extra if isinstance(extra, str) and extra.strip() else "")]
    qid = obj.get("question_id", obj.get("id", obj.get("uid", i)))
    return Question(str(qid), str(obj.get("category") or "default"), turns) if turns else None


def question_file(name) -> Path:
    """A shipped set's name (`vicuna`) or a path. A file of that name in the working directory wins."""
    path = Path(name).expanduser()
    if not path.exists() and str(name) in SHIPPED:
        return DATA_DIR / SHIPPED[str(name)]
    if not path.is_file():
        raise UserError(f"questions file not found: {path} (or name a shipped set: {', '.join(SHIPPED)})")
    return path


def load_questions(path, limit: int | None = None, categories: list[str] | None = None) -> list[Question]:
    path = question_file(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    records: list = []
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} starts like a JSON list but is not valid JSON: {e}") from None
    else:
        # split on "\n" only: JSON strings may hold U+2028 and other characters splitlines() breaks on
        lines = [line for line in text.split("\n") if line.strip()]
        for n, line in enumerate(lines, 1):
            if line.lstrip()[:1] in "{\"":
                try:
                    records.append(json.loads(line))
                    continue
                except json.JSONDecodeError:
                    if line.lstrip().startswith("{"):
                        raise UserError(f"{path}:{n} is not valid JSON") from None
            records.append(line)  # a plain text line is a prompt
    read = [_record(r, i) for i, r in enumerate(records)]
    questions = [q for q in read if q is not None]
    if not questions:
        raise UserError(f"{path} holds no questions (expected JSONL with 'turns', 'messages' or 'prompt'/'instruction'/"
                        "'question' fields, a JSON list, or text lines)")
    unread = sum(q is None and isinstance(r, dict) for q, r in zip(read, records))
    if unread:  # a set that shrinks without a word skews every figure measured on it
        print(f"{path}: {unread} of {len(records)} records skipped: no 'turns', 'messages' or prompt field with text",
              file=sys.stderr)
    if categories:
        known = sorted({q.category for q in questions})
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise UserError(f"no questions in category {', '.join(unknown)}; {path} has: {', '.join(known)}")
        questions = [q for q in questions if q.category in categories]
    return questions[:limit] if limit else questions
