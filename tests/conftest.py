"Shared pytest set-up: quiet progress bars, one torch thread per xdist worker, tmp settings."
import os

os.environ.setdefault("XR0_PROGRESS", "0")
# Two xdist workers on two cores: one intra-op thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


import pytest


@pytest.fixture(scope="module")
def one_thread():
    "Tiny models on a shared 2-core box: one intra-op thread is several times faster than two fighting; restored afterwards."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
