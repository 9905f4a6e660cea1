"""`draftheads chat`, driven with scripted input and a captured console."""

import io

import pytest
from rich.console import Console

from draftheads.chat import run_chat, trim_history
from tiny import tiny_draftmodel


@pytest.fixture(scope="module")
def model():
    return tiny_draftmodel()


def _run(model, lines, **kw):
    feed = iter(lines)

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    history = run_chat(model, read=read, console=Console(file=out, width=200, color_system=None), **kw)
    return history, out.getvalue()


def test_multi_turn_matches_generate(model):
    err = io.StringIO()
    history, out = _run(model, ["hello", "and then?"], max_new_tokens=10,  # then end of input
                        err=Console(file=err, width=200, color_system=None))
    first = model.generate([{"role": "user", "content": "hello"}], max_new_tokens=10)
    second = model.generate(history[:3], max_new_tokens=10)
    assert history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.text},
                       {"role": "user", "content": "and then?"}, {"role": "assistant", "content": second.text}]
    # the speed line after every reply goes to stderr, as generate's does; stdout holds the replies
    assert err.getvalue().count("tok/s") == 2 and "tokens/step" in err.getvalue() and "tok/s" not in out


def test_piped_input_is_echoed_so_the_reply_starts_its_own_line(model, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))  # not a terminal: input() does not echo
    out = io.StringIO()
    run_chat(model, console=Console(file=out, width=200, color_system=None), max_new_tokens=6,
             err=Console(file=io.StringIO()))
    assert "you> " in capsys.readouterr().out  # input()'s prompt
    lines = out.getvalue().split("\n")
    assert lines[1] == "hello" and len(lines) > 3  # help, the echoed message, then the reply below it


def test_reset_and_exit(model):
    history, out = _run(model, ["hello", "/reset", "fresh start", "/exit", "never read"], max_new_tokens=6)
    third = model.generate([{"role": "user", "content": "fresh start"}], max_new_tokens=6)
    assert history == [{"role": "user", "content": "fresh start"}, {"role": "assistant", "content": third.text}]
    assert "conversation cleared" in out


def test_end_of_input_and_unknown_command(model):
    history, out = _run(model, ["/help", "/[/x]", "hi"], max_new_tokens=4, system="be brief")
    assert "unknown command /help" in out
    assert "unknown command /[/x]" in out  # said as typed, not read as the console's markup (which raised)
    assert history[0] == {"role": "system", "content": "be brief"} and len(history) == 3


def test_history_is_trimmed_to_fit(model):
    turns = [{"role": "system", "content": "sys"}]
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " + "x" * 40},
                  {"role": "assistant", "content": f"answer {i} " + "y" * 40}]
    turns.append({"role": "user", "content": "last"})
    budget = 200
    kept = trim_history(model, turns, budget)
    assert len(model.prompt_ids(turns)) > budget >= len(model.prompt_ids(kept))
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last" and kept[1]["role"] == "user"
    assert kept == turns[:1] + turns[len(turns) - len(kept) + 1:]  # the newest turns, whole exchanges


def test_message_longer_than_the_context_is_refused(model):
    history, out = _run(model, ["z" * 600, "/exit"], max_new_tokens=8)
    assert history == [] and "prompt budget" in out
