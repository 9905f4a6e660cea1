"""The one exception type for a user's mistake: the CLI prints its message as one line, no traceback."""


class UserError(Exception):
    """A problem with what the user asked for (path, tree, heads, prompt), explained in one line."""
