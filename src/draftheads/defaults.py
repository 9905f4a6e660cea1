"""Defaults every command shares, defined once. Imports nothing heavy: the CLI reads them to build
its parser, and `--help` must not pay for importing torch."""

from __future__ import annotations

# torch CPU threads for every command (--threads). 0 keeps torch's own choice (one per core).
THREADS = 0

# New tokens per reply for `generate`, `chat` and the Python API: long enough that a typical
# assistant answer ends at its end-of-turn token rather than mid-sentence (256 cut replies short).
MAX_NEW_TOKENS = 512

# Prompt-lookup branches in the tree (--lookup / --no-lookup, load(lookup=...)): off until a measurement
# shows where they pay off (issue 16).
LOOKUP = False

# Requests the server decodes together (--max-batch): each verify pass covers every running request's
# tree (batch.py). 1 serves one request at a time.
MAX_BATCH = 8


def set_threads(threads: int | None) -> None:
    """Apply --threads: 0 or None leaves torch's default."""
    if threads is not None and threads < 0:
        from .errors import UserError

        raise UserError(f"--threads must be 0 (torch's default) or more, not {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)
