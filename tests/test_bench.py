"""`draftheads bench` on a tiny model: the report files, greedy agreement, and user errors."""

import json

import pytest

from draftheads.cli import main
from draftheads.errors import UserError
from draftheads.questions import load_questions
from bench_fixtures import tiny_dirs  # noqa: F401  (fixture)


def test_bench_writes_report_json_md_and_plots(tiny_dirs, tmp_path):
    bb, heads, questions = tiny_dirs
    out = tmp_path / "report"
    rc = main(["bench", str(questions), "--backbone", str(bb), "--heads", str(heads), "--limit", "3",
               "--max-new-tokens", "12", "--out", str(out), "--tree", "medusa8", "--latency-sizes", "1,2,4",
               "--latency-steps", "2", "--threads", "1"])
    assert rc == 0
    for name in ("report.json", "report.md", "speedup_per_category.png", "accepted_lengths.png", "verify_latency.png"):
        assert (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["overall"]) == {"transformers", "loop", "speculative", "prompt_lookup"}
    assert rep["greedy_mismatches"]["count"] == 0, rep["greedy_mismatches"]["items"]
    assert rep["overall"]["transformers"]["speedup"] == 1.0
    assert rep["overall"]["speculative"]["mean_accepted"] >= 1
    assert set(rep["per_category"]) == {"a", "b"}
    # a two-turn question is two generations per method
    assert rep["overall"]["loop"]["generations"] == 4
    assert [x["size"] for x in rep["verify_latency"]] == [1, 2, 4]
    assert "Speedup per category" in (out / "report.md").read_text()


def test_bench_user_errors(tiny_dirs, tmp_path, capsys):
    bb, heads, questions = tiny_dirs
    base = ["--backbone", str(bb), "--heads", str(heads), "--out", str(tmp_path / "r")]
    assert main(["bench", str(tmp_path / "missing.jsonl"), *base]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["bench", str(questions), "--categories", "nope", *base]) == 2
    assert "category nope" in capsys.readouterr().err


def test_question_formats(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question_id": 7, "category": "math", "turns": ["a", "b"]}\n"just a string"\n'
                 '{"instruction": "do it", "input": "on this"}\n{"prompt": "p"}\n')
    qs = load_questions(f)
    assert [(q.qid, q.category, q.turns) for q in qs] == [
        ("7", "math", ["a", "b"]), ("1", "default", ["just a string"]), ("2", "default", ["do it\n\non this"]),
        ("3", "default", ["p"])]
    (tmp_path / "l.json").write_text('[{"question": "q1"}, "q2"]')
    assert [q.turns for q in load_questions(tmp_path / "l.json")] == [["q1"], ["q2"]]
    (tmp_path / "t.txt").write_text("line one\n\nline two\n")
    assert [q.turns for q in load_questions(tmp_path / "t.txt", limit=1)] == [["line one"]]
    assert load_questions(f, categories=["math"])[0].qid == "7"
    (tmp_path / "empty.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(UserError, match="no questions"):
        load_questions(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="category"):
        load_questions(f, categories=["poetry"])
    with pytest.raises(UserError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")
