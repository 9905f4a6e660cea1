"""`draftheads generate` and the public API on a tiny model saved to disk; every user error is one
line on stderr and exit code 2."""

import json
import subprocess
import sys

import pytest

import draftheads
from bench_fixtures import tiny_dirs  # noqa: F401  (pytest fixture)
from draftheads.cli import main


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
    (["--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
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
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


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
