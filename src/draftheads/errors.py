"""The one exception type for a user's mistake (the CLI prints its message as one line, no traceback), and the
checks that say such a mistake in a command's arguments before its work starts."""

import argparse
from pathlib import Path


class UserError(Exception):
    """A problem with what the user asked for (path, tree, heads, prompt), explained in one line."""


def one_of(value: str, choices: tuple[str, ...], source: str) -> str:
    """`value` if it is one of `choices`, else a UserError naming `source` (an option or environment variable)."""
    if value not in choices:
        raise UserError(f"{source} must be one of {', '.join(choices)}, not {value!r}")
    return value


def at_least(low: int, high: int | None = None):
    """An argparse type: an integer of at least `low` (and at most `high`), so a bad count is refused before any
    model loads, in argparse's one line."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'in {low}..{high}' if high is not None else f'at least {low}'}, "
                                             f"not {value}")
        return value

    return parse


def output_dir(path, source: str):
    """`path` as a directory a command writes into later (made once its work can start): a UserError now where a
    file holds its name or a parent's, as the work would otherwise fail only when it writes, at its end."""
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise UserError(f"{source} {path}: {q} is a file, not a directory")
            break
    return p


def output_file(path, source: str):
    """`path` as a file a command writes later: a UserError now where a directory holds its name or a file a parent's."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{source} {path} is a directory: name a file")
    output_dir(p.parent, source)
    return p
