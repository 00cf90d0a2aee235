"""Distributed equivalence of the SSL statistics: 2 CPU ranks (gloo) on a split batch == 1 process on the whole batch.

Also checks that a DINOHead (weight-norm parametrisation) fully sharded with FSDP2 gives the single-process
forward and gradients.
"""
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from xr0_lib.ssl.centering import CenterEMA, sinkhorn_knopp
from xr0_lib.models.heads import DINOHead

WORLD = 2
K = 12


def _data():
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(8, K, generator=g) * 2          # DINO: equal rows per rank
    patches = torch.randn(11, K, generator=g) * 2     # iBOT masked tokens: 7 on rank 0, 4 on rank 1
    cls2 = torch.randn(8, K, generator=g)
    return cls, patches, cls2, [7, 4]


def _split(x, sizes, rank):
    return torch.split(x, sizes)[rank]


def _stats(rank, cls, patches, cls2, sizes):
    half = cls.shape[0] // WORLD
    out = {}
    out["sk_cls"] = sinkhorn_knopp(_split(cls, [half] * WORLD, rank), temp=0.5)
    out["sk_patch"] = sinkhorn_knopp(_split(patches, sizes, rank), temp=0.5)
    out["sk_empty"] = sinkhorn_knopp(patches[:0] if rank == 1 else patches, temp=0.5)  # one rank with no masked token
    c = CenterEMA(K)                                   # lazy (async all-reduce), applied at the next softmax
    c.update(_split(cls, [half] * WORLD, rank))
    out["probs"] = c.softmax_center(_split(cls2, [half] * WORLD, rank), 0.1)
    c.update(_split(cls2, [half] * WORLD, rank))
    out["center"] = c.state_dict()["center"]
    ce = CenterEMA(K, lazy=False)
    ce.update(_split(patches, sizes, rank))
    out["center_patch"] = ce.center.clone()
    return out


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        cls, patches, cls2, sizes = _data()
        torch.save(_stats(rank, cls, patches, cls2, sizes), Path(out_dir) / f"stats{rank}.pt")
        _fsdp_head(rank, out_dir)
    finally:
        dist.destroy_process_group()


def _head_and_batch():
    torch.manual_seed(1)
    head = DINOHead(16, out_dim=24, hidden_dim=20, bottleneck_dim=8)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    return head, x


def _fsdp_head(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    head, x = _head_and_batch()
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(head, mesh=mesh)
    xs = x.chunk(WORLD)[rank]
    y = head(xs)
    (y.square().sum() / x.shape[0]).backward()       # the mean over the global batch, as FSDP averages grads
    grads = {n: p.grad.full_tensor() * WORLD for n, p in head.named_parameters()}  # FSDP2 reduce-scatter averages
    torch.save({"y": y.detach(), "grads": grads}, Path(out_dir) / f"fsdp{rank}.pt")


@pytest.fixture(scope="module")
def dist_results():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"), d), nprocs=WORLD, join=True)
        yield ([torch.load(Path(d) / f"stats{r}.pt", weights_only=True) for r in range(WORLD)],
               [torch.load(Path(d) / f"fsdp{r}.pt", weights_only=True) for r in range(WORLD)])


def test_sinkhorn_and_center_split_equals_whole(dist_results):
    per_rank, _ = dist_results
    cls, patches, cls2, sizes = _data()
    # single process on the whole batch (no process group here)
    assert not dist.is_initialized()
    whole = {
        "sk_cls": sinkhorn_knopp(cls, 0.5), "sk_patch": sinkhorn_knopp(patches, 0.5), "sk_empty": sinkhorn_knopp(patches, 0.5),
    }
    cat = lambda k: torch.cat([r[k] for r in per_rank])
    for k in ("sk_cls", "sk_patch", "sk_empty"):
        torch.testing.assert_close(cat(k), whole[k], rtol=1e-5, atol=1e-6)
    c = CenterEMA(K)
    c.update(cls)
    torch.testing.assert_close(cat("probs"), c.softmax_center(cls2, 0.1), rtol=1e-5, atol=1e-6)
    c.update(cls2)
    for r in per_rank:
        torch.testing.assert_close(r["center"], c.state_dict()["center"], rtol=1e-5, atol=1e-7)
    ce = CenterEMA(K, lazy=False); ce.update(patches)
    for r in per_rank:  # unequal token counts per rank: still the global token mean
        torch.testing.assert_close(r["center_patch"], ce.center, rtol=1e-5, atol=1e-7)


def test_fsdp2_weight_norm_head_matches_single_process(dist_results):
    _, per_rank = dist_results
    head, x = _head_and_batch()
    y = head(x)
    (y.square().sum() / x.shape[0]).backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in per_rank]), y.detach(), rtol=1e-5, atol=1e-6)
    for n, p in head.named_parameters():
        for r in per_rank:
            torch.testing.assert_close(r["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
