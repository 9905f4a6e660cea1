"""draftheads: speculative decoding with draft heads for Hugging Face causal LMs."""

from .errors import UserError

__all__ = ["DraftModel", "Result", "Tree", "UserError", "load", "load_tree"]
__version__ = "0.1.0"

# Imported on first use (PEP 562), not here: importing torch and transformers takes seconds, and
# `draftheads --help` or a user error should not wait for them.
_LAZY = {"DraftModel": "draftmodel", "Result": "draftmodel", "load": "draftmodel", "Tree": "tree", "load_tree": "tree"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'draftheads' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
