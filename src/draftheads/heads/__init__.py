from .checkpoint import build_heads, load_heads, save_heads
from .hydra import HydraHeads
from .medusa import HeadsConfig, MedusaHeads

__all__ = ["HeadsConfig", "HydraHeads", "MedusaHeads", "build_heads", "load_heads", "save_heads"]
