"""The one exception type for a user's mistake: the CLI prints its message as one line, no traceback."""


class UserError(Exception):
    """A problem with what the user asked for (path, tree, heads, prompt), explained in one line."""


def one_of(value: str, choices: tuple[str, ...], source: str) -> str:
    """`value` if it is one of `choices`, else a UserError naming `source` (an option or environment variable)."""
    if value not in choices:
        raise UserError(f"{source} must be one of {', '.join(choices)}, not {value!r}")
    return value
