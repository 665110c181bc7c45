import pytest
import torch


@pytest.fixture
def poisoned_memory():
    """Every torch.empty is filled with NaN, so an output the code forgets to write shows up
    (warn_only: CUDA ops without a deterministic kernel still run)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
