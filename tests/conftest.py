"""Shared fixtures. ``shared_data``: the real data sets in ../shared/data (skip when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real data sets (mnist/, fashion_mnist/, cifar10/); skips the test if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests use tiny tensors, where a second intra-op thread costs more than it gains, and
    oversubscribed cores (two tests' worth of threads on 2 cores) slow them tenfold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomise_bn(model, bias_low: float = -0.5) -> None:
    """Non-trivial BatchNorm affine parameters and statistics (fresh ones are the identity), seeded;
    biases in [bias_low, bias_low + 1)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.rand(n, generator=g) + bias_low
            m.running_mean = torch.rand(n, generator=g) - 0.5
            m.running_var = torch.rand(n, generator=g) + 0.5
