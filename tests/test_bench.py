"""`draftheads bench` on a tiny model: the report files, greedy agreement, and user errors."""

import json

import pytest
import torch

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
    assert set(rep["overall"]) == {"transformers", "loop", "speculative", "lookup", "hybrid", "prompt_lookup"}
    assert rep["overall"]["lookup"]["nodes_per_step"] >= 1 and rep["config"]["lookup"]["tokens"] >= 1
    assert rep["greedy_mismatches"]["count"] == 0, rep["greedy_mismatches"]["items"]
    assert rep["overall"]["transformers"]["speedup"] == 1.0
    assert rep["overall"]["speculative"]["mean_accepted"] >= 1
    assert set(rep["per_category"]) == {"a", "b"}
    # a two-turn question is two generations per method
    assert rep["overall"]["loop"]["generations"] == 4
    assert [x["size"] for x in rep["verify_latency"]] == [1, 2, 4]
    md = (out / "report.md").read_text()
    assert "Speedup per category" in md and "heads over our own loop" in md
    o = rep["overall"]
    own = f"{o['speculative']['tokens_per_s'] / o['loop']['tokens_per_s']:.2f}x |"
    assert next(line for line in md.splitlines() if line.startswith("| overall |")).endswith(own)


def test_bench_times_the_calibrated_tree_with_its_cut_for_one_sequence(tiny_dirs, tmp_path):
    """Heads whose config holds a cut for one sequence are benched as load() decodes with them: cut (fewer nodes a
    step than the tree has), still exact; a --tree is verified whole."""
    bb, heads, questions = tiny_dirs
    cfg = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps({**cfg, "tree": [[0], [0, 0], [0, 0, 0]], "batch_draft_confidence": {"1": 0.05}}))
    reps = {}
    for name, extra in (("cut", []), ("named", ["--tree", "chain3"])):
        out = tmp_path / name
        assert main(["bench", str(questions), "--backbone", str(bb), "--heads", str(heads), "--limit", "3",
                     "--max-new-tokens", "12", "--out", str(out), "--latency-sizes", "1", "--latency-steps", "2",
                     "--threads", "1", "--methods", "transformers,loop,speculative", *extra]) == 0
        reps[name] = json.loads((out / "report.json").read_text())
        assert reps[name]["greedy_mismatches"]["count"] == 0
    assert reps["cut"]["config"]["cut"] == 0.05 and "path probability of 0.05" in (tmp_path / "cut" / "report.md").read_text()
    assert 1 < reps["cut"]["overall"]["speculative"]["nodes_per_step"] < 4
    assert reps["named"]["config"]["cut"] == 0.0 and reps["named"]["overall"]["speculative"]["nodes_per_step"] > 3.5


def test_in_bf16_the_heads_are_checked_against_our_own_loop(tiny_dirs, tmp_path):
    """bf16 on a CPU: transformers' stock kernels round otherwise than the row-exact loop, so exactness is
    checked against the loop (0 differ), and transformers' differences are reported apart."""
    bb, heads, questions = tiny_dirs
    out = tmp_path / "report"
    assert main(["bench", str(questions), "--backbone", str(bb), "--heads", str(heads), "--limit", "3",
                 "--max-new-tokens", "12", "--out", str(out), "--tree", "medusa8", "--latency-sizes", "1",
                 "--latency-steps", "2", "--threads", "1", "--dtype", "bfloat16",
                 "--methods", "transformers,loop,speculative"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["exactness_reference"] == "loop" and rep["config"]["baseline"] == "transformers"
    assert rep["greedy_mismatches"]["count"] == 0, rep["greedy_mismatches"]["items"]
    assert "count" in rep["baseline_rounding_differences"]
    assert "Greedy outputs that differ from our loop, no heads: 0" in (out / "report.md").read_text()


def test_a_difference_between_two_roundings_of_the_model_is_not_judged_as_a_tie():
    """Exactness differences are judged by the top-2 gap against a float tie; transformers' outputs against our
    int8 / bf16 loop are another rounding of the model, whose gaps are reported without a verdict."""
    from types import SimpleNamespace

    from draftheads.bench import _explain

    q = SimpleNamespace(qid=1, category="writing")
    logits = lambda ids: torch.tensor([2.0, 1.5, 0.0])  # noqa: E731  (a top-2 gap of 0.5)
    judged = _explain(logits, [5], [1, 2], [1, 3], q, 0, "speculative", 1e-3)
    assert judged["first_difference"] == 1 and judged["top2_logit_gap"] == 0.5
    assert judged["explanation"] == "NOT a tie: the outputs should agree"
    assert _explain(logits, [5], [1, 2], [1, 3], q, 0, "loop", None)["explanation"] == "another rounding of the model"


def test_bench_user_errors(tiny_dirs, tmp_path, capsys):
    bb, heads, questions = tiny_dirs
    base = ["--backbone", str(bb), "--heads", str(heads), "--out", str(tmp_path / "r")]
    assert main(["bench", str(tmp_path / "missing.jsonl"), *base]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["bench", str(questions), "--categories", "nope", *base]) == 2
    assert "category nope" in capsys.readouterr().err


def test_question_formats(tmp_path, capsys):
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
    # distill's chat records: the user turns (stop 56: calibrate's data-free prompts were skipped without a word)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"id": "free:3", "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "u2"}]}) + "\n")
    assert [(q.qid, q.turns) for q in load_questions(tmp_path / "chat.jsonl")] == [("free:3", ["u1", "u2"])]
    (tmp_path / "mixed.jsonl").write_text('{"prompt": "p"}\n{"foo": 1}\n{"prompt": "  "}\n')
    assert [q.turns for q in load_questions(tmp_path / "mixed.jsonl")] == [["p"]]
    assert "2 of 3 records skipped" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(UserError, match="no questions"):
        load_questions(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="category"):
        load_questions(f, categories=["poetry"])
    with pytest.raises(UserError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")


def test_shipped_question_set_by_name(tmp_path, monkeypatch):
    qs = load_questions("vicuna")
    assert len(qs) == 80 and len({q.category for q in qs}) == 9
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vicuna").write_text("my own prompt\n")  # a file of that name wins over the shipped set
    assert [q.turns for q in load_questions("vicuna")] == [["my own prompt"]]
    with pytest.raises(UserError, match="shipped set: vicuna"):
        load_questions("vicunaa")


def test_plots_keep_bars_visible_and_count_in_integers(tmp_path, monkeypatch):
    from draftheads import bench

    figs = {}
    monkeypatch.setattr(bench, "_save", lambda fig, path: figs.setdefault(path.name, fig) and path.name)
    row = lambda s: {"speedup": s, "tokens_per_s": 10 * s}  # noqa: E731
    speed = {"transformers": 1.0, "loop": 1.2, "speculative": 2.1, "prompt_lookup": 0.9}
    rep = {"per_category": {c: {m: row(v) for m, v in speed.items()} for c in ("coding", "math")},
           "overall": {m: row(v) for m, v in speed.items()}, "accepted_histogram": {1: 30, 2: 4, 3: 1},
           "verify_latency": []}
    bench.write_plots(rep, tmp_path)
    fig = figs["speedup_per_category.png"]
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.y0 >= axes.y1  # above the axes: it cannot cover a bar
    ax = figs["accepted_lengths.png"].axes[0]
    for ticks in (ax.get_xticks(), ax.get_yticks()):
        assert all(float(t).is_integer() for t in ticks)


def test_full_load_counts_only_while_every_client_is_sending():
    from draftheads.bench_serve import full_load

    def req(client, start, ttft, end, tokens):
        return {"client": client, "start": start, "ttft": ttft, "end": end, "tokens": tokens}

    # client 0: two requests over [0, 4]; client 1: one over [1, 10]. Full load: [1, 4].
    results = [req(0, 0.0, 1.0, 2.0, 11), req(0, 2.0, 0.0, 4.0, 21), req(1, 1.0, 1.0, 10.0, 9)]
    tokens, seconds = full_load(results)
    assert seconds == 3.0
    # the first: its first token at 1 (in), 10 more over [1, 2], all in; the second: 1 + 20 over [2, 4];
    # the third: first token at 2 (in), 8 more over [2, 10], of which [2, 4] is in: 2
    assert tokens == pytest.approx(11 + 21 + 1 + 2)
    assert full_load([req(0, 0.0, 1.0, 2.0, 5), req(1, 3.0, 1.0, 5.0, 5)]) == (0.0, 0.0)  # never both at once
    assert full_load([req(0, 0.0, 1.0, 3.0, 5)]) == (pytest.approx(5.0), 3.0)  # one client: the whole level


def test_bench_concurrency_gives_lookup_to_the_heads_servers_only():
    from draftheads.bench_serve import server_configs

    for lookup, flag in ((None, []), (True, ["--lookup"]), (False, ["--no-lookup"])):
        configs = server_configs("hydra", 8, lookup)
        assert configs["heads, batched"] == ["--heads", "hydra", *flag, "--max-batch", "8"]
        assert configs["heads, serial"] == ["--heads", "hydra", *flag, "--max-batch", "1"]
        # plain decoding stays plain whatever serve's default for lookup is
        assert configs["plain, batched"] == ["--heads", "none", "--no-lookup", "--max-batch", "8"]
    assert server_configs("none", 4, True) == {"plain, batched": ["--heads", "none", "--no-lookup", "--max-batch", "4"],
                                               "plain, serial": ["--heads", "none", "--no-lookup", "--max-batch", "1"]}


def test_bench_concurrency_serves_on_the_engine_it_is_given(monkeypatch):
    """`bench --engine llama.cpp --concurrency ...` measures llama.cpp servers: every server gets the engine (and the
    model flags) the bench was given, before its configuration's own."""
    import argparse

    from draftheads import bench_serve

    started = []

    def start(model_args, extra):
        started.append(model_args + extra)
        raise RuntimeError("not started")

    monkeypatch.setattr(bench_serve, "start_server", start)
    args = argparse.Namespace(concurrency=[1], requests_per_client=1, questions="vicuna", threads=1, backbone=None,
                              engine="llama.cpp", device=None, dtype=None, tree=None, heads="default", max_batch=4,
                              lookup=None, max_new_tokens=8)
    with pytest.raises(RuntimeError, match="not started"):
        bench_serve.run_concurrency(args)
    assert started == [["--threads", "1", "--engine", "llama.cpp", "--heads", "default", "--max-batch", "4"]]


def test_bench_concurrency_loads_real_servers_on_loopback(tiny_dirs, tmp_path):
    """--concurrency starts `draftheads serve` processes (heads batched, plain batched, heads serial) and
    streams to each from concurrent clients; replies at 2 clients equal those decoded alone."""
    bb, heads, questions = tiny_dirs
    out = tmp_path / "conc"
    rc = main(["bench", str(questions), "--backbone", str(bb), "--heads", str(heads), "--concurrency", "1,2",
               "--requests-per-client", "1", "--max-new-tokens", "6", "--max-batch", "2", "--tree", "medusa8",
               "--threads", "1", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["configs"]) == ["heads, batched", "plain, batched", "heads, serial"]
    for name, cfg in rep["configs"].items():
        assert [lv["clients"] for lv in cfg["levels"]] == [1, 2] and all(lv["requests"] == 2 for lv in cfg["levels"])
        assert all(lv["tokens_per_s"] > 0 and lv["ttft_p95"] >= lv["ttft_p50"] > 0 for lv in cfg["levels"]), name
    assert rep["configs"]["heads, batched"]["differ_from_alone"] == {"1": 0, "2": 0}
    # the batched heads server measures its rounds of 2+ sequences (round_costs.py; whether the two requests
    # overlapped is up to timing); alone a request takes its tree unasked; without heads, nothing to decide
    rounds = rep["configs"]["heads, batched"]["batched_rounds"]
    assert rounds is None or set(rounds) == {"2"}
    assert rep["configs"]["plain, batched"]["batched_rounds"] is None
    # each level's time per phase of every worker (server.Worker.phases); the serial one runs a sequence a pass
    for name, cfg in rep["configs"].items():
        for lv in cfg["levels"]:
            ph = lv["phases"]
            assert ph["passes"] >= 2 and ph["passes"] <= ph["sequences"] <= lv["clients"] * ph["passes"], (name, ph)
            assert 0 < ph["passes_s"] and ph["admit_s"] + ph["passes_s"] + ph["advance_s"] <= lv["wall_s"], (name, ph)
            assert 0 < ph["admit_s"] and (ph["passes"] == ph["sequences"]) >= (name == "heads, serial"), (name, ph)
    assert all(lv["full_load_tokens_per_s"] > 0 for cfg in rep["configs"].values() for lv in cfg["levels"])
    # every server keeps recent prompts (kvcache.PromptCache): the warm-up and 2 requests at each of 2 levels
    assert all(cfg["prompt_cache"]["prompts"] == 5 for cfg in rep["configs"].values())
    assert "- heads, serial: " in (out / "report.md").read_text().split("Prompts that started as a recent one")[1]
    phases = (out / "report.md").read_text().split("Where the workers")[1]
    assert "| plain, batched | 2 |" in phases and "| heads, serial | 1 |" in phases
    assert (out / "concurrency.png").read_bytes()[:4] == b"\x89PNG" and "| heads, batched | 2 |" in (out / "report.md").read_text()
    assert "heads, serial `--heads " + str(heads) + " --max-batch 1`" in (out / "report.md").read_text()
