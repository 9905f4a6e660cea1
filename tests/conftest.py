import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import the tiny-model helpers as `tiny`
# Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP's spinning threads
# made a test 70x slower (measured): one thread keeps test times stable.
torch.set_num_threads(1)
