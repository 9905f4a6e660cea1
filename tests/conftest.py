import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import the tiny-model helpers as `tiny`
# Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP's spinning threads
# made a test 70x slower (measured): one thread keeps test times stable.
torch.set_num_threads(1)


@pytest.fixture
def kv_float32(monkeypatch):
    """Caches keep float32 keys and values for the test: for comparisons with transformers' own forward, which
    keeps them so (by default a float32 CPU forward stores them in float16: defaults.KV_CACHE)."""
    from draftheads import kvcache

    monkeypatch.setattr(kvcache, "_KV_CACHE", "float32")
