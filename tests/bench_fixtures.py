"""A tiny backbone, its heads and a question file on disk, as a user would pass them to the CLI."""

import json

import pytest

from draftheads.heads import save_heads
from tiny import tiny_heads, tiny_model, tiny_tokenizer

QUESTIONS = [{"question_id": 1, "category": "a", "turns": ["hello there", "and more"]},
             {"question_id": 2, "category": "b", "turns": ["abc abc abc abc"]},
             {"question_id": 3, "category": "a", "turns": ["xyz"]}]


@pytest.fixture
def tiny_dirs(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    bb, heads = tmp_path / "backbone", tmp_path / "heads"
    model.save_pretrained(bb)
    tok.save_pretrained(bb)
    save_heads(tiny_heads(model, 3), heads)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return bb, heads, questions
