"""Test-wide settings: one intra-op thread keeps the tiny-model tests fast on the 2-core CI machine, where
torch's default threading oversubscribes the cores (and the DataLoader workers)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def logged_values(monkeypatch) -> list[tuple[str, object]]:
    """(name, value) of every ``LightningModule.log`` call (callbacks' ``pl_module.log`` included)."""
    import lightning as L

    logged = []
    log = L.LightningModule.log

    def recording(self, name, value, *args, **kwargs):
        logged.append((name, value))
        return log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", recording)
    return logged
