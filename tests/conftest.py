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
