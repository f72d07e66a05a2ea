import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test single-threaded. The training tests use models of a few thousand parameters that gain
    nothing from a second thread, while on a shared, oversubscribed 2-core machine OpenMP's spin-waiting
    made the 2-thread SelfFusion run cost 28 s of CPU instead of 1 s (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
