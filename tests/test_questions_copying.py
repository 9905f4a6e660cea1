"""The shipped held-out set `copying`: prompts whose answers copy from the prompt (translation,
summaries, RAG, code edits, rewrites, extraction), for measuring prompt lookup and hybrid trees."""

import re
from collections import Counter

from draftheads.questions import DATA_DIR, SHIPPED, load_questions

CATEGORIES = {"translation", "summarization", "rag", "code_edit", "rewrite", "extraction"}
# words in the given material (passage, text or code) that an answer can copy: (min, max)
MATERIAL_WORDS = {"translation": (60, 120), "summarization": (150, 250), "rag": (150, 250),
                  "rewrite": (80, 150), "extraction": (60, 250)}


def _material(category: str, turn: str) -> str:
    """The part of the prompt the answer copies from: what follows the instruction."""
    if category == "code_edit":
        blocks = re.findall(r"```(?:python|javascript)\n(.*?)\n```", turn, re.S)
        assert len(blocks) == 1, turn[:80]
        return blocks[0]
    instruction, body = turn.split("\n\n", 1)
    assert instruction.strip() and body.strip()
    if category == "rag":
        assert body.startswith("Passage:\n") and "\n\nQuestion: " in body, turn[:80]
        body = body.removeprefix("Passage:\n").rsplit("\n\nQuestion: ", 1)[0]
    return body


def test_copying_set_loads_by_name_and_ships_in_the_package():
    assert (DATA_DIR / SHIPPED["copying"]).is_file()
    qs = load_questions("copying")
    assert len(qs) == 30
    assert Counter(q.category for q in qs) == {c: 5 for c in CATEGORIES}
    assert len({q.qid for q in qs}) == 30
    assert all(len(q.turns) == 1 and q.turns[0].strip() for q in qs)
    # interleaved, so that --limit 6 (12, ...) still covers every category
    assert {q.category for q in load_questions("copying", limit=6)} == CATEGORIES
    assert len(load_questions("copying", categories=["translation", "rag"])) == 10


def test_copying_prompts_give_prompt_lookup_material_to_copy():
    for q in load_questions("copying"):
        turn = q.turns[0]
        assert len(turn.split()) >= 60, (q.qid, q.category)  # every prompt, instruction included
        material = _material(q.category, turn)
        if q.category == "code_edit":
            assert 15 <= len(material.splitlines()) <= 40, q.qid
            continue
        lo, hi = MATERIAL_WORDS[q.category]
        assert lo <= len(material.split()) <= hi, (q.qid, q.category, len(material.split()))
    # every passage and code block is different (no accidental duplicates)
    materials = [_material(q.category, q.turns[0]) for q in load_questions("copying")]
    assert len(set(materials)) == 30
