"""`draftheads generate` and the public API on a tiny model saved to disk; every user error is one
line on stderr and exit code 2."""

import json
import re
import os
import subprocess
import sys

import pytest
import torch

import draftheads
from bench_fixtures import tiny_dirs  # noqa: F401  (pytest fixture)
from draftheads import defaults
from draftheads.cli import main
from draftheads.errors import UserError


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_text_and_prints_stats(tiny_dirs, capsys):
    bb, heads, _ = tiny_dirs
    code, out, err = run_cli(capsys, "generate", "hello", "--backbone", str(bb), "--heads", str(heads),
                             "--max-new-tokens", "20")
    assert code == 0
    assert "tok/s" in err and "tokens/step" in err and "verify" in err
    api = draftheads.load(heads=str(heads), backbone=str(bb))
    result = api.generate("hello", max_new_tokens=20)
    assert out.rstrip("\n") == result.text
    plain = draftheads.load(heads=None, backbone=str(bb)).generate("hello", max_new_tokens=20)
    assert result.token_ids == plain.token_ids and result.stats.new_tokens == 20


def test_generate_json_in_a_subprocess(tiny_dirs):
    bb, heads, _ = tiny_dirs
    proc = subprocess.run([sys.executable, "-m", "draftheads.cli", "generate", "hi", "--backbone", str(bb), "--heads",
                           str(heads), "--max-new-tokens", "8", "--json", "--temperature", "0.8", "--seed", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["token_ids"]) == 8 and data["stats"]["steps"] >= 1 and data["finish_reason"] == "length"


def test_stream_equals_text_and_stop_strings(tiny_dirs):
    bb, heads, _ = tiny_dirs
    model = draftheads.load(heads=str(heads), backbone=str(bb))
    full = model.generate("abc", max_new_tokens=40)
    assert "".join(model.stream("abc", max_new_tokens=40)) == full.text
    stop = full.text[10:13]
    cut = model.generate("abc", max_new_tokens=40, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    assert "".join(model.stream("abc", max_new_tokens=40, stop=[stop])) == cut.text


@pytest.mark.parametrize("args,message", [
    (["--heads", "/no/such/heads"], "heads directory not found"),
    (["--tree", "/no/tree.json"], "tree file not found"),
    (["--tree", "medusa63", "--prompt-override", ""], "the prompt is empty"),
    (["--backbone", "/no/such/model"], "backbone path not found"),
    (["--temperature", "-1"], "temperature must be"),
])
def test_user_errors_are_one_line(tiny_dirs, capsys, tmp_path, args, message):
    bb, heads, _ = tiny_dirs
    prompt = "hello"
    if "--prompt-override" in args:
        prompt, args = "", args[:2]
    base = {"--backbone": str(bb), "--heads": str(heads)}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    code, _, err = run_cli(capsys, "generate", prompt, *[x for kv in base.items() for x in kv])
    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("draftheads: note:")]  # e.g. the tree note
    assert len(lines) == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, not 0"),
    (["generate", "x", "--seed", str(2**64)], "argument --seed: must be in"),
    (["generate", "x", "--top-k", "-3"], "argument --top-k: must be at least 0"),
    (["bench", "vicuna", "--limit", "-1"], "argument --limit: must be at least 0, not -1"),
    (["bench", "vicuna", "--concurrency", "0"], "each must be at least 1"),
    (["calibrate", "--prompts", "p", "--latency-steps", "1"], "argument --latency-steps: must be at least 2"),
    (["serve", "--port", "99999"], "argument --port: must be in 0..65535, not 99999"),
    (["distill", "--prompts", "p", "--output", "o", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["distill", "--prompts", "p", "--output", "o", "--num", "-1"], "argument --num: must be at least 1"),
    (["train", "--data", "d", "--output", "o", "--checkpoint-every", "0"], "argument --checkpoint-every: must be at least 1"),
    (["train", "--data", "d", "--output", "o", "--feature-batch", "x"], "expected an integer, not 'x'"),
])
def test_a_bad_count_is_refused_in_one_line_before_anything_loads(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    _, err = capsys.readouterr()
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_path_that_cannot_take_the_output_is_refused_before_the_work(tiny_dirs, capsys, tmp_path):
    bb, heads, _ = tiny_dirs
    a_file, a_dir = tmp_path / "f", tmp_path / "d"
    a_file.write_text("x")
    a_dir.mkdir()
    for argv, message in [
        (["bench", "vicuna", "--out", str(a_file / "report")], f"--out {a_file / 'report'}: {a_file} is a file"),
        (["calibrate", "--prompts", "p", "--out", str(a_dir)], f"--out {a_dir} is a directory: name a file"),
        (["export", "--heads", str(heads), "--to", "vllm", "--out", str(a_file)], f"{a_file} is a file, not a directory"),
        (["distill", "--prompts", "p", "--output", str(a_file / "x.jsonl")], f"{a_file} is a file, not a directory"),
        (["train", "--data", "d", "--output", str(a_file)], f"--output {a_file}: {a_file} is a file"),
        (["generate", "x", "--backbone", str(bb), "--heads", str(heads), "--tree", str(a_dir)], "cannot read tree file"),
        (["generate", "x", "--backbone", str(bb), "--heads", str(heads), "--device", "tpu"], "unknown device 'tpu'"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert not any(a_dir.iterdir()) and a_file.read_text() == "x"  # nothing written anywhere


def test_bad_tree_and_mismatched_heads(tiny_dirs, capsys, tmp_path):
    bb, heads, _ = tiny_dirs
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]))
    code, _, err = run_cli(capsys, "generate", "x", "--backbone", str(bb), "--heads", str(heads), "--tree", str(deep))
    assert code == 2 and "depth 4 but the heads have only 3" in err
    from tiny import tiny_model, tiny_tokenizer
    other = tmp_path / "other"
    tiny_model(seed=9).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    code, _, err = run_cli(capsys, "generate", "x", "--backbone", str(other), "--heads", str(heads))
    assert code == 2 and "trained for backbone" in err


def test_prompt_longer_than_context(tiny_dirs, capsys):
    bb, heads, _ = tiny_dirs
    code, _, err = run_cli(capsys, "generate", "x" * 600, "--backbone", str(bb), "--heads", str(heads))
    assert code == 2 and "context is 512" in err


def test_context_limit_ends_generation_cleanly(tiny_dirs):
    bb, heads, _ = tiny_dirs
    model = draftheads.load(heads=str(heads), backbone=str(bb))
    result = model.generate("y" * 470, max_new_tokens=200)
    prompt_len = result.stats.prompt_tokens
    assert result.finish_reason == "context" and prompt_len + len(result.token_ids) <= 512


# ------------------------------------------------------------------ defaults, help, threads, stats


def _subcommands():
    from draftheads.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    return sub.choices


def test_help_shows_defaults_and_describes_every_option(capsys):
    for name, parser in _subcommands().items():
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no description"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "(default: 512)" in out and "(default: greedy)" in out and "(default: 0)" in out  # threads
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "(default: 4096)" in out and "(default: float16)" in out


def test_help_imports_no_torch():
    code = "import sys; from draftheads.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr


def test_threads_flag_on_every_command_that_runs_torch(tiny_dirs, capsys):
    import torch

    from draftheads import defaults

    commands = _subcommands()
    for name in ("generate", "chat", "serve", "bench", "calibrate", "export", "distill", "train"):
        flag = next(a for a in commands[name]._actions if "--threads" in a.option_strings)
        assert flag.default == defaults.THREADS, name
    bb, heads, _ = tiny_dirs
    before = torch.get_num_threads()
    try:
        assert main(["generate", "hi", "--backbone", str(bb), "--heads", str(heads), "--max-new-tokens", "2",
                     "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["generate", "hi", "--backbone", str(bb), "--threads", "-1"]) == 2
    assert "--threads must be" in capsys.readouterr().err


def test_activations_flag_sets_the_products_rounding_and_a_bad_setting_is_one_line(tiny_dirs, capsys, monkeypatch):
    from draftheads import defaults, few_rows

    commands = _subcommands()
    for name in ("generate", "chat", "serve", "bench", "calibrate", "export", "distill", "train"):
        assert any("--activations" in a.option_strings for a in commands[name]._actions), name
    bb, heads, _ = tiny_dirs
    monkeypatch.setattr(few_rows, "_ACTIVATIONS", defaults.ACTIVATIONS)
    assert main(["generate", "hi", "--backbone", str(bb), "--heads", str(heads), "--max-new-tokens", "2", "--activations",
                 "float32"]) == 0
    assert few_rows.activations() == "float32"
    from draftheads import cpu_matmul

    assert cpu_matmul._ROUTES  # read for float32 by the run
    few_rows.set_activations("int8")
    assert few_rows.activations() == "int8" and not cpu_matmul._ROUTES  # the packed-row limit is the other kind's
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--backbone", str(bb), "--activations", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    # the environment's setting is read when the kernels' module is imported: a bad one is a one-line error
    env = dict(os.environ, DRAFTHEADS_ACTIVATIONS="int4")
    run = subprocess.run([sys.executable, "-m", "draftheads.cli", "generate", "hi", "--backbone", str(bb), "--heads", str(heads),
                          "--max-new-tokens", "1", "--threads", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "draftheads: error: $DRAFTHEADS_ACTIVATIONS must be one of int8, float32, not 'int4'"], run.stderr


def test_kv_cache_setting_from_the_cli_the_api_and_the_environment(tiny_dirs, capsys, monkeypatch):
    """A float32 model on a CPU keeps its cache in float16 by default (--kv-cache float32: as computed); greedy
    speculation stays exact either way, and a bad kind is a one-line error."""
    import torch

    from draftheads import kvcache

    bb, heads, _ = tiny_dirs
    monkeypatch.setattr(kvcache, "_KV_CACHE", defaults.KV_CACHE)
    assert draftheads.load(heads=None, backbone=str(bb)).decoder.engine.new_cache(8).kv_dtype == torch.float16
    assert main(["generate", "hi", "--backbone", str(bb), "--heads", str(heads), "--max-new-tokens", "2", "--kv-cache",
                 "float32"]) == 0
    assert kvcache.kv_cache() == "float32"
    for kind, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        spec = draftheads.load(heads=str(heads), backbone=str(bb), kv_cache=kind)
        assert kvcache.kv_cache() == kind and spec.decoder.engine.new_cache(8).kv_dtype == dtype
        plain = draftheads.load(heads=None, backbone=str(bb))
        assert spec.generate("hello", max_new_tokens=24).token_ids == plain.generate("hello", max_new_tokens=24).token_ids
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--backbone", str(bb), "--kv-cache", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    env = dict(os.environ, DRAFTHEADS_KV_CACHE="bf16")
    run = subprocess.run([sys.executable, "-m", "draftheads.cli", "generate", "hi", "--backbone", str(bb), "--max-new-tokens",
                          "1", "--threads", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "draftheads: error: $DRAFTHEADS_KV_CACHE must be one of float16, float32, not 'bf16'"], run.stderr


def test_heads_without_a_tree_get_a_safe_tree_and_say_so(tiny_dirs, capsys, tmp_path):
    from draftheads.draftmodel import safe_tree

    bb, heads, _ = tiny_dirs
    model = draftheads.load(heads=str(heads), backbone=str(bb))
    err = capsys.readouterr().err
    assert model.tree.to_json() == [[0], [1], [0, 0]]  # small: a CPU verify of <= 4 nodes costs one token's
    assert "no tree calibrated for cpu" in err and "[[0], [1], [0, 0]]" in err and "draftheads calibrate" in err
    assert safe_tree("cpu", 1).to_json() == [[0], [1]] and safe_tree("cpu", 3, "llama.cpp").size == 1
    assert safe_tree("cuda", 3).size > safe_tree("cpu", 3).size
    draftheads.load(heads=str(heads), backbone=str(bb), tree="chain2")  # an explicit tree: nothing to say
    assert "no tree calibrated" not in capsys.readouterr().err
    cfg = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps({**cfg, "tree": [[0]]}))
    assert draftheads.load(heads=str(heads), backbone=str(bb)).tree.to_json() == [[0]]
    (heads / "config.json").write_text(json.dumps({**cfg, "tree": []}))  # calibrated plain: kept, not "none"
    assert draftheads.load(heads=str(heads), backbone=str(bb)).tree.size == 1
    assert "no tree calibrated" not in capsys.readouterr().err


def test_exact_at_temperature_zero_says_it_is_greedy(tiny_dirs, capsys):
    bb, heads, _ = tiny_dirs
    code, out, err = run_cli(capsys, "generate", "hi", "--backbone", str(bb), "--heads", str(heads),
                             "--max-new-tokens", "4", "--acceptance", "exact")
    assert code == 0 and "at temperature 0 is greedy decoding" in err
    code, out, err = run_cli(capsys, "generate", "hi", "--backbone", str(bb), "--heads", str(heads),
                             "--max-new-tokens", "4", "--acceptance", "exact", "--temperature", "0.5", "--seed", "0")
    assert code == 0 and "greedy decoding" not in err


def test_stats_add_up_tokens_per_step_is_the_histograms_mean(tiny_dirs, capsys):
    from draftheads.draftmodel import _kept_per_step

    assert _kept_per_step([3, 3, 3], 6) == [3, 2, 0]  # the prefill's token is no step's
    bb, heads, _ = tiny_dirs
    model = draftheads.load(heads=str(heads), backbone=str(bb), tree="chain3")
    full = model.generate("abc", max_new_tokens=40)
    for kw in ({"max_new_tokens": 40}, {"max_new_tokens": 7}, {"max_new_tokens": 40, "stop": full.text[12:15]}):
        s = model.generate("abc", **kw).stats
        d = s.to_dict()
        hist = d["accepted_histogram"]
        assert s.new_tokens == 1 + sum(s.accepted) and s.steps == len(s.accepted), kw
        assert d["mean_accepted"] == pytest.approx(sum(k * v for k, v in hist.items()) / sum(hist.values())), kw


def test_generate_and_stream_name_themselves_on_a_wrong_keyword(tiny_dirs):
    bb, heads, _ = tiny_dirs
    model = draftheads.load(heads=str(heads), backbone=str(bb))
    with pytest.raises(TypeError, match=r"generate\(\) got an unexpected keyword argument 'max_tokens'"):
        model.generate("hi", max_tokens=3)
    with pytest.raises(TypeError, match=r"stream\(\) got an unexpected keyword argument 'temp'"):
        list(model.stream("hi", temp=0.5))
    assert "max_new_tokens" in model.generate.__doc__ and "as for `generate`" in model.stream.__doc__


def test_default_threads_step_aside_for_a_busy_machine(monkeypatch, capsys):
    import os

    from draftheads import defaults

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert defaults._threads_for_load() is None and capsys.readouterr().err == ""  # quiet: torch's default
    monkeypatch.setattr(os, "getloadavg", lambda: (1.3, 1.0, 1.0))
    assert defaults._threads_for_load() == 1 and "busy" in capsys.readouterr().err
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert defaults._threads_for_load() == 1 and "--threads N chooses" in capsys.readouterr().err
    # a command without --threads (ngrams) is not told to use it
    from draftheads.cli import main

    import torch

    threads = torch.get_num_threads()
    try:
        assert main(["ngrams", "--data", "/no/such/data", "--heads", "/no/such/heads"]) == 2
    finally:
        torch.set_num_threads(threads)  # the note's command set 1 for this process
    err = capsys.readouterr().err
    assert "machine is busy" in err and "--threads" not in err


@pytest.mark.parametrize("flag,message", [("--prefill-chunk", "--prefill-chunk must be 0 or more"),
                                          ("--max-tree-rows", "--max-tree-rows must be 0 or more"),
                                          ("--prompt-cache-tokens", "--prompt-cache-tokens must be 0 or more"),
                                          ("--max-batch", "--max-batch must be at least 1"),
                                          ("--draft-confidence", "--draft-confidence must be at least 0 and below 1"),
                                          ("--max-seq-len", "--max-seq-len must be at least 1"),
                                          ("--max-seq-len=10", "--max-seq-len must be at least 64")])
def test_serve_limits_are_checked_before_loading(capsys, flag, message):
    args = [flag] if "=" in flag else [flag, "-1"]
    code, _, err = run_cli(capsys, "serve", *args, "--backbone", "/no/such/model")
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["-0.1", "1"])
def test_calibrate_checks_draft_confidence_before_loading(capsys, value):
    code, _, err = run_cli(capsys, "calibrate", "--prompts", "/no/such/prompts.jsonl", "--draft-confidence", value,
                           "--backbone", "/no/such/model")
    assert code == 2 and "--draft-confidence must be at least 0 and below 1" in err and "Traceback" not in err


def test_calibrate_checks_choose_by_replies_before_loading(capsys):
    code, _, err = run_cli(capsys, "calibrate", "--prompts", "/no/such/prompts.jsonl", "--choose-by-replies", "-1",
                           "--backbone", "/no/such/model")
    assert code == 2 and "--choose-by-replies must be at least 0" in err and "Traceback" not in err


def test_api_mistakes_are_user_errors_and_an_empty_stop_string_is_ignored(tiny_dirs):
    bb, heads, _ = tiny_dirs
    m = draftheads.load(heads=str(heads), backbone=str(bb))
    plain = m.generate("hello", max_new_tokens=8)
    assert plain.text and m.generate("hello", max_new_tokens=8, stop="").text == plain.text  # "" ends nothing
    assert [r.text for r in m.generate(["hello", "hello"], max_new_tokens=8, stop="")] == [plain.text] * 2
    # A temperature above 0 samples exactly unless told otherwise, as on the command line and the server
    sampled = m.generate("hello", max_new_tokens=8, temperature=0.7, seed=1)
    assert sampled.token_ids == m.generate("hello", max_new_tokens=8, temperature=0.7, seed=1, acceptance="exact").token_ids
    # OpenAI's developer turn is the template's system turn, in the API as in the server
    turns = lambda role: [{"role": role, "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert m.prompt_ids(turns("developer")) == m.prompt_ids(turns("system")) != m.prompt_ids(turns("user"))
    vocab = m.backbone.get_input_embeddings().num_embeddings
    for call, message in [
        (lambda: m.generate(torch.tensor([[vocab]])), f"token ids must be integers in [0, {vocab})"),
        (lambda: m.generate(torch.tensor([[-1, 5]])), "token ids must be integers"),
        (lambda: m.generate(torch.tensor([1.5, 2.5])), "token ids must be integers"),
        (lambda: m.generate(["hi", torch.tensor([[vocab]])]), "token ids must be integers"),
        (lambda: m.generate_many(["hi"], max_batch=0), "max_batch must be an integer of at least 1"),
        (lambda: m.generate("hi", max_new_tokens="5"), "max_new_tokens must be an integer"),
        (lambda: m.generate("hi", max_new_tokens=2.5), "max_new_tokens must be an integer"),
        (lambda: m.generate("hi", temperature="0.5"), "temperature must be a number"),
        (lambda: m.generate("hi", temperature=0.7, top_k=2.5), "top_k must be an integer"),
        (lambda: m.generate("hi", temperature=0.7, seed=2**70), "seed must be in"),
        (lambda: m.generate("hi", stop=5), "stop must be a string or a list of strings"),
        (lambda: m.generate("hi", temperature=0.7, acceptance="typical", typical_epsilon=-1), "typical_epsilon"),
        (lambda: m.generate([{"role": "user", "content": 5}]), "a message's content must be a string"),
        (lambda: m.generate([{"role": "usr", "content": "hi"}]), "a message's role must be one of system, developer"),
        (lambda: m.generate([{"content": "hi"}]), "a message's role must be one of"),
        (lambda: m.generate("hi", tree=[0, 1]), "a tree must be a list of paths of ranks"),
        (lambda: m.generate("hi", tree=[[0.5]]), "a tree must be a list of paths of ranks"),
        (lambda: m.generate("hi", tree=[[True]]), "a tree must be a list of paths of ranks"),
        (lambda: draftheads.load(heads=123, backbone=str(bb)), "heads must be a directory"),
        (lambda: draftheads.load(heads=str(heads), backbone=str(bb), device="tpu"), "unknown device 'tpu'"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            call()


def test_serve_refuses_a_port_in_use_before_loading(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_cli(capsys, "serve", "--port", str(taken.getsockname()[1]), "--backbone", "/no/such/model")
    assert code == 2 and "cannot listen on 127.0.0.1:" in err and "Traceback" not in err


def test_load_pays_the_first_decode_s_one_off_costs_so_no_request_counts_them(tiny_dirs, monkeypatch):
    """The C++ kernels pack a model's weights at its first decode (~2 s for the default model, which the first
    request's statistics reported as its prefill): load() warms the model up, so a request packs nothing."""
    from draftheads import few_rows
    from draftheads.draftmodel import DraftModel

    bb, heads, _ = tiny_dirs
    packed, real = [], few_rows.pack
    monkeypatch.setattr(few_rows, "pack", lambda w: packed.append(w) or real(w))
    m = draftheads.load(heads=str(heads), backbone=str(bb))
    assert packed  # the warm-up packed (or tried to pack) the weights
    packed.clear()
    m.generate("hello", max_new_tokens=8)
    assert packed == []
    monkeypatch.setattr(DraftModel, "warm_up", lambda self: None)  # the control: without it the request packs
    draftheads.load(heads=str(heads), backbone=str(bb)).generate("hello", max_new_tokens=8)
    assert packed
