"""draftheads: speculative decoding with draft heads for Hugging Face causal LMs."""

from .draftmodel import DraftModel, Result, load
from .errors import UserError
from .tree import Tree, load_tree

__all__ = ["DraftModel", "Result", "Tree", "UserError", "load", "load_tree"]
__version__ = "0.1.0"
