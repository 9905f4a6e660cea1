"""Self-distillation: prompt formats, dedup, mixing, and resume after a real SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import tiny_model, tiny_tokenizer

from draftheads.errors import UserError
from draftheads.train.distill import DistillConfig, JsonlAppender, SourceSpec, plan
from draftheads.train.prompts import load_prompts

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, lines) -> Path:
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) or path.suffix != ".txt" else x for x in lines) + "\n")
    return path


def test_prompt_formats(tmp_path):
    assert load_prompts(_write(tmp_path / "q.jsonl", [{"question": "Q1", "answer": "a"}])) == ["Q1"]
    assert load_prompts(_write(tmp_path / "p.jsonl", [{"uid": 1, "prompt": "P1"}])) == ["P1"]
    assert load_prompts(_write(tmp_path / "t.jsonl", [{"turns": ["T1", "T2"]}])) == ["T1"]
    assert load_prompts(_write(tmp_path / "s.jsonl", ["bare one", "bare two"])) == ["bare one", "bare two"]
    assert load_prompts(_write(tmp_path / "x.txt", ["line one", "", "line two"])) == ["line one", "line two"]
    lst = tmp_path / "i.json"
    lst.write_text(json.dumps([{"instruction": "Do X", "input": "on Y", "response": "r"}, {"instruction": "Do Z", "input": ""}]))
    assert load_prompts(lst) == ["Do X\n\non Y", "Do Z"]
    si = _write(tmp_path / "si.jsonl", [{"id": 1, "instruction": "Fix", "instances": [{"input": "code", "output": "o"}]}])
    assert load_prompts(si) == ["Fix\n\ncode"]
    assert load_prompts(_write(tmp_path / "f.jsonl", [{"q": "mine", "question": "no"}]), field="q") == ["mine"]
    u = tmp_path / "u.jsonl"  # U+2028 inside a JSON string is not a line break
    u.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert load_prompts(u) == ["a\u2028b"]


def test_prompt_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty"):
        load_prompts(tmp_path / "e.jsonl")
    with pytest.raises(UserError, match="field 'nope'"):
        load_prompts(_write(tmp_path / "q.jsonl", [{"question": "Q"}]), field="nope")


def test_plan_dedups_and_mixes(tmp_path):
    tok = tiny_tokenizer()
    a = _write(tmp_path / "a.txt", [f"prompt {i}" for i in range(10)] + ["Prompt  3", "prompt 1"])
    b = _write(tmp_path / "b.txt", ["prompt 2", "other 1", "other 2", "other 3", "other 4"])
    jobs = plan(DistillConfig(output="x", sources=[SourceSpec(str(a), 1.0), SourceSpec(str(b), 1.0)]), tok)
    assert len({j.id for j in jobs}) == len(jobs) == 14  # 10 + 4 (b's "prompt 2" repeats a's)
    cfg = DistillConfig(output="x", sources=[SourceSpec(str(a), 3.0), SourceSpec(None, 1.0)], num=8)
    jobs = plan(cfg, tok)
    assert sum(j.prompt is None for j in jobs) == 2 and sum(j.source == "a.txt" for j in jobs) == 6
    assert [j.id for j in plan(cfg, tok)] == [j.id for j in jobs]  # the same command plans the same run


def test_torn_last_line_is_cut(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_bytes(b'{"id": "a", "messages": []}\n{"id": "b", "mes')
    out = JsonlAppender(p)
    assert [r["id"] for r in out.records] == ["a"]
    out.append([{"id": "c"}])
    out.close()
    assert [json.loads(x)["id"] for x in p.read_text().splitlines()] == ["a", "c"]


def test_distill_cli_resumes_after_sigkill(tmp_path):
    bb = tmp_path / "bb"
    tiny_model().save_pretrained(bb)
    tiny_tokenizer().save_pretrained(bb)
    prompts = _write(tmp_path / "p.txt", [f"question number {i}" for i in range(16)])
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "draftheads.cli", "distill", "--backbone", str(bb), "--prompts", str(prompts),
           "-o", str(out), "--batch-size", "1", "--max-new-tokens", "32", "--no-progress", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_killed = out.read_bytes().count(b"\n")
    assert proc.returncode == -signal.SIGKILL and 2 <= n_killed < 16, (proc.returncode, n_killed, proc.stderr.read())
    with open(out, "ab") as f:  # as if the kill had landed mid-write
        f.write(b'{"id": "torn", "messages": [{"ro')
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) == 16  # nothing lost, nothing twice
    assert {r["messages"][0]["content"] for r in recs} == {f"question number {i}" for i in range(16)}
    assert all(r["messages"][1]["role"] == "assistant" for r in recs)


def test_distill_shards_resume_after_sigkill_with_hidden_states(tmp_path):
    """Directory output: shards + hidden states; a SIGKILL mid-run, then the same command, gives every
    record once, and the stored hidden states equal a fresh forward over the stored ids."""
    import torch

    from draftheads.train.shards import read_distilled

    bb = tmp_path / "bb"
    model = tiny_model()
    model.save_pretrained(bb)
    tiny_tokenizer().save_pretrained(bb)
    prompts = _write(tmp_path / "p.txt", [f"question number {i}" for i in range(24)])
    out = tmp_path / "distilled"
    cmd = [sys.executable, "-m", "draftheads.cli", "distill", "--backbone", str(bb), "--prompts", str(prompts),
           "--data-free", "0.3", "--num", "31", "-o", str(out), "--shard-size", "4", "--batch-size", "3",
           "--max-new-tokens", "40", "--no-progress", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "shard-00001.jsonl.gz").exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    part = out / "partial.jsonl"
    if part.exists():  # as if the kill had landed mid-write
        with open(part, "ab") as f:
            f.write(b'{"id": "torn", "messages": [{"ro')
    with open(out / "features" / "partial.bin", "ab") as f:
        f.write(b"\x00" * 130)  # rows of a record whose line never made it
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    recs, hidden = read_distilled(out)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) and len(ids) >= 24  # every file prompt; data-free ones that finished
    assert {r["messages"][0]["content"] for r in recs if r["source"] == "p.txt"} == {f"question number {i}" for i in range(24)}
    assert not (out / "partial.jsonl").exists() or not (out / "partial.jsonl").read_text()  # a clean stop leaves shards
    man = json.loads((out / "manifest.json").read_text())
    assert man["totals"]["records"] == len(recs) and man["backbone_fingerprint"]
    assert all(h is not None for h in hidden)
    for r, h in list(zip(recs, hidden))[::5]:
        ref = model.base_model(input_ids=torch.tensor([r["ids"]])).last_hidden_state[0]
        assert h.shape == ref.shape
        torch.testing.assert_close(h.float(), ref, atol=2e-2, rtol=1e-2)
        tok = tiny_tokenizer()
        assert tok.decode(r["ids"][r["prompt_len"]:], skip_special_tokens=True).strip() == r["messages"][1]["content"]
    # A fresh clone has the shards without their features: the trainer's fill pass recomputes them, a shard at
    # a time, and a pass killed midway keeps the shards it finished.
    from draftheads.train.shards import fill_features
    from draftheads.train.trainer import backbone_hidden

    for f in (out / "features").glob("shard-*.safetensors"):
        f.unlink()
    calls = []

    def dies_in_second_shard(seqs):
        calls.append(len(seqs))
        if sum(calls) > 4:  # shards hold 4 records: the kill lands in the second one
            raise KeyboardInterrupt
        return backbone_hidden(model, seqs, "cpu")

    with pytest.raises(KeyboardInterrupt):
        fill_features(out, dies_in_second_shard, batch_tokens=64, progress=False)
    assert sorted(p.name for p in (out / "features").glob("shard-*")) == ["shard-00000.safetensors"]
    assert fill_features(out, lambda seqs: backbone_hidden(model, seqs, "cpu"), batch_tokens=64, progress=False) \
        == len(list(out.glob("shard-*.jsonl.gz"))) - 1
    refilled = read_distilled(out)[1]
    for h, g in zip(hidden, refilled):
        torch.testing.assert_close(g.float(), h.float(), atol=2e-2, rtol=1e-2)
    assert fill_features(out, dies_in_second_shard, progress=False) == 0  # nothing left to compute


def test_a_resumed_set_keeps_its_activations_and_an_older_manifest_means_float32(tmp_path):
    """The answers' rounding (README, --activations) is a fixed setting of a distilled set; a manifest written
    before the setting existed was made with x as it is (float32)."""
    import torch

    from draftheads.errors import UserError
    from draftheads.train.shards import ShardWriter

    d, old = tmp_path / "dist", {"backbone_fingerprint": "fp", "hidden_size": 3}
    w = ShardWriter(d, 2, old)
    w.append([{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
               "ids": [1, 2, 3], "prompt_len": 1, "source": "t"} for i in range(2)], [torch.zeros(3, 3)] * 2)
    w.close()
    assert "activations" not in json.loads((d / "manifest.json").read_text())
    ShardWriter(d, 2, {**old, "activations": "float32"}).close()
    with pytest.raises(UserError, match=r"dist was distilled with activations='float32', this run has 'int8': use "
                                        r"another output directory, or the same setting$"):
        ShardWriter(d, 2, {**old, "activations": "int8"})
    ShardWriter(d, 2, {**old, "activations": "float32", "kv_cache": "float32"}).close()  # the cache's: as old
    with pytest.raises(UserError, match=r"dist was distilled with kv_cache='float32', this run has 'float16'"):
        ShardWriter(d, 2, {**old, "activations": "float32", "kv_cache": "float16"})


def test_requests_queued_after_the_plan_ran_out_are_decoded():
    """A finished request may queue another (distill: a data-free question, then its answer) after next_request
    has already returned None: the engine asks again whenever a slot is free, so no follow-up is dropped (they
    were, and a resumed run dropped the same ones again: 2 of 12 data-free conversations were written)."""
    from draftheads.acceptance import SamplingConfig
    from draftheads.train.batch_generate import BatchGenerator, Request

    engine = BatchGenerator(tiny_model(), 3, 32, [], 0)
    # question 0 and its answer finish while the others are still being written
    planned = [Request([1, 2, 3 + i], 2 if i == 0 else 12, SamplingConfig(), False, ("question", i)) for i in range(3)]
    ready, done = [], []

    def next_request():
        return ready.pop() if ready else planned.pop(0) if planned else None

    for f in engine.run(next_request):
        kind, i = f.request.tag
        done.append(f.request.tag)
        if kind == "question":
            ready.append(Request(f.request.ids + f.new_ids, 2, SamplingConfig(), False, ("answer", i)))
    assert sorted(done) == [("answer", i) for i in range(3)] + [("question", i) for i in range(3)]
