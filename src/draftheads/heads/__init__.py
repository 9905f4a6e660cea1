from .checkpoint import load_heads, save_heads
from .medusa import HeadsConfig, MedusaHeads

__all__ = ["HeadsConfig", "MedusaHeads", "load_heads", "save_heads"]
