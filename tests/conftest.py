"""Test-wide settings: one intra-op thread keeps the tiny-model tests fast on the 2-core CI machine, where
torch's default threading oversubscribes the cores (and the DataLoader workers)."""

import torch

torch.set_num_threads(1)
