"""End to end on a toy: multi-crop batch -> tiny student/teacher -> heads -> DINO + iBOT + KoLeo, centring both ways.

Checks that one optimiser step moves only the student, that the loss at a uniform teacher is ln K, and that the
dense and flat iBOT losses agree on the collated mask indices.
"""
import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xr0_lib.augment import collate_dino, multicrop_preset, toy_radiograph
from xr0_lib.models.heads import make_heads
from xr0_lib.ssl.centering import CenterEMA, sinkhorn_knopp
from xr0_lib.ssl.losses import dino_loss, ibot_loss, ibot_loss_masked, koleo_loss


class _TinyViT(nn.Module):
    """Patchify + one mixing layer: enough to produce a CLS and patch tokens with a mask token."""
    def __init__(self, dim=32, patch=14):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.mix = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.embed_dim = dim

    def forward(self, x, masks=None):
        t = self.patch(x).flatten(2).transpose(1, 2)               # (B, N, D)
        if masks is not None: t = torch.where(masks[..., None], self.mask_token.to(t.dtype), t)
        t = self.mix(t)
        return t.mean(1), t


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
def test_one_step_moves_only_the_student(centering):
    torch.manual_seed(0); rng = random.Random(0)
    mc = multicrop_preset("small", n_local=2)
    batch = collate_dino([mc(toy_radiograph(128, seed=i)) for i in range(3)], rng=rng)
    B = 3
    student = _TinyViT(); s_dino, s_ibot = make_heads(32, "tiny")
    s_all = nn.ModuleList([student, s_dino])
    t_all = copy.deepcopy(s_all).requires_grad_(False)
    teacher, t_dino = t_all
    before = [p.clone() for p in t_all.parameters()]
    dino_c, ibot_c = CenterEMA(256), CenterEMA(256)
    temp = 0.04

    with torch.no_grad():
        t_cls, t_patch = teacher(batch["global_crops"])
        t_cls_logits = t_dino(t_cls)
        t_mask_logits = t_dino(t_patch.flatten(0, 1)[batch["mask_indices"]])
        if centering == "ema":
            t_cls_p, t_mask_p = dino_c.softmax_center(t_cls_logits, temp), ibot_c.softmax_center(t_mask_logits, temp)
            dino_c.update(t_cls_logits); ibot_c.update(t_mask_logits)
        else:
            t_cls_p, t_mask_p = sinkhorn_knopp(t_cls_logits, temp), sinkhorn_knopp(t_mask_logits, temp)
    g_cls, g_patch = student(batch["global_crops"], masks=batch["masks"].view(2 * B, -1))
    l_cls, _ = student(batch["local_crops"])
    s_glob, s_loc = s_dino(g_cls).chunk(2), s_dino(l_cls).chunk(2)
    loss_dino = dino_loss(list(s_glob) + list(s_loc), list(t_cls_p.chunk(2)), ignore_diagonal=True)
    s_mask_logits = s_ibot(g_patch.flatten(0, 1)[batch["mask_indices"]])
    loss_ibot = ibot_loss_masked(s_mask_logits, t_mask_p, batch["mask_weights"], n_masked_crops=2 * B)
    # the dense variant on the full token grid agrees
    dense_t = torch.zeros(2 * B * 64, 256); dense_t[batch["mask_indices"]] = t_mask_p
    dense = ibot_loss(s_ibot(g_patch).detach(), dense_t.view(2 * B, 64, 256), batch["masks"])
    assert torch.allclose(dense, loss_ibot.detach(), atol=1e-5)
    loss_koleo = sum(koleo_loss(c) for c in g_cls.chunk(2))
    loss = loss_dino + loss_ibot + 0.1 * loss_koleo
    assert torch.isfinite(loss)
    opt = torch.optim.AdamW(s_all.parameters(), lr=1e-2)
    loss.backward(); opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, t_all.parameters()))          # teacher untouched
    assert all(p.grad is None for p in t_all.parameters())
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0
    if centering == "ema":
        assert dino_c.state_dict()["center"].abs().sum() > 0                          # the update landed


def test_uniform_teacher_gives_log_k():
    torch.manual_seed(0)
    K, B = 4096, 3
    s = [torch.zeros(B, K) for _ in range(10)]
    t = [torch.full((B, K), 1 / K)] * 2
    assert math.isclose(dino_loss(s, t, ignore_diagonal=True).item(), math.log(K), rel_tol=1e-5)
