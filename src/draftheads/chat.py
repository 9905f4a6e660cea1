"""`draftheads chat`: a multi-turn conversation in the terminal, streamed, with live speed figures.

The whole history is re-sent every turn (the loop keeps no cache between calls), trimmed from the
oldest turns so that prompt + reply fit the model's context window.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from .defaults import MAX_NEW_TOKENS
from .errors import UserError

HELP = "[dim]/reset clears the conversation, /exit (or Ctrl-D) leaves[/dim]"


def trim_history(model, history: list[dict], budget: int) -> list[dict]:
    """Drop the oldest exchanges (keeping a leading system message) until the prompt fits `budget` tokens."""
    system = history[:1] if history and history[0]["role"] == "system" else []
    turns = history[len(system):]
    while turns and len(model.prompt_ids(system + turns)) > budget:
        # Drop one exchange: the oldest user message and the assistant reply after it.
        turns = turns[2:] if len(turns) > 1 and turns[1]["role"] == "assistant" else turns[1:]
    return system + turns


def run_chat(model, read: Callable[[str], str] = input, console: Console | None = None,
             max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0, top_p: float = 1.0,
             system: str | None = None, seed: int | None = None, err: Console | None = None) -> list[dict]:
    """Talk until /exit or end of input; returns the history (what the next turn would send). Replies
    go to `console` (stdout), each reply's statistics to `err` (stderr), as `generate` does."""
    console = console or Console()
    err = err or Console(stderr=True)
    # Piped input is not echoed, so the reply would follow "you> " on the same line: echo the message.
    echo = read is input and not sys.stdin.isatty()
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    context = model.decoder.context
    budget = context - max_new_tokens
    if budget < 16:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in a {context}-token context")
    console.print(HELP)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return history
        if echo:
            console.print(line, markup=False, highlight=False)
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return history
        if line == "/reset":
            history = list(base)
            console.print("[dim](conversation cleared)[/dim]")
            continue
        if line.startswith("/"):
            console.print(f"[yellow]unknown command {escape(line.split()[0])}[/yellow] {HELP}")
            continue
        message = {"role": "user", "content": line}
        trimmed = trim_history(model, history + [message], budget)
        if not trimmed or trimmed[-1] is not message:
            console.print(f"[red]that message alone is over the {budget}-token prompt budget; say less[/red]")
            continue
        if len(trimmed) < len(history) + 1:
            console.print(f"[dim](dropped {len(history) + 1 - len(trimmed)} old messages to fit the context)[/dim]")
        history = trimmed
        reply = _turn(model, history, console, err, max_new_tokens, temperature, top_p, seed)
        history.append({"role": "assistant", "content": reply})


def _turn(model, history, console, err, max_new_tokens, temperature, top_p, seed) -> str:
    text, result, chunks, start = "", None, 0, time.perf_counter()
    acceptance = "exact" if temperature > 0 else "greedy"

    def view(status: str | None = None):  # the live estimate under the text while it streams
        return Text(text) if status is None else Group(Text(text), Text(status, style="dim"))

    # Redrawn when a chunk arrives rather than by a timer thread: one less thread competing with the model.
    with Live(view(""), console=console, auto_refresh=False, transient=False) as live:
        try:
            for chunk in model.iter_generate(history, max_new_tokens=max_new_tokens, temperature=temperature,
                                             top_p=top_p, acceptance=acceptance, seed=seed):
                text += chunk.text
                chunks += 1
                result = chunk.result or result
                if result is None:
                    # Live figures are estimates (the exact counts arrive with the last chunk): tokens
                    # re-counted from the text; steps counted as chunks (one per decoding step).
                    n = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
                    live.update(view(f"~{n / (time.perf_counter() - start):.1f} tok/s, ~{n / chunks:.2f} tokens/step"),
                                refresh=True)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            live.update(view(), refresh=True)
            result = None
        else:
            live.update(view(), refresh=True)  # the reply alone stays on stdout; its figures go to stderr
    if not console.is_terminal:  # Live ends its last line itself only on a terminal (piped output)
        console.print()
    if result is None:
        err.print("[dim](interrupted)[/dim]")
        return text
    s = result.stats
    err.print(f"[{s.new_tokens} tokens, {s.tokens_per_second:.1f} tok/s, prefill + {s.steps} steps x "
              f"{s.mean_accepted:.2f} tokens/step, finish: {result.finish_reason}]", style="dim", markup=False,
              highlight=False)
    return result.text
