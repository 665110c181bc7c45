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


def pytest_collection_modifyitems(config, items):
    """The kernel compile check runs last (see test_kernel_compile.start_compiles)."""
    compile_checks = [item for item in items if _is_compile_check(item)]
    items[:] = [item for item in items if not _is_compile_check(item)] + compile_checks


def pytest_runtestloop(session):
    """Starts the kernel compiles before the first test, where the suite runs that check."""
    check = next((item for item in session.items if _is_compile_check(item)), None)
    if check is not None and not session.config.option.collectonly:
        check.module.start_compiles()


def _is_compile_check(item) -> bool:
    return getattr(item, "module", None) is not None and item.module.__name__.rpartition(".")[2] == "test_kernel_compile"
