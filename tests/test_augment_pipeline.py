"""Integration: PNG files -> MultiCrop in a DataLoader -> collate_dino, plus fuzzing of the mask sampler and of bad inputs."""
import random
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from xr0_lib.augment import (MaskingGenerator, MultiCrop, collate_dino, multicrop_preset, toy_radiograph,
                             _reference_block_cap)


class _PngSet(torch.utils.data.Dataset):
    def __init__(self, paths, transform): self.paths, self.transform = paths, transform
    def __len__(self): return len(self.paths)
    def __getitem__(self, i): return self.transform(self.paths[i]), i


def test_dataloader_end_to_end(tmp_path):
    paths = []
    for i in range(4):
        p = tmp_path / f"x{i}.png"
        Image.fromarray(toy_radiograph(96 + 16 * i, seed=i)).save(p)  # different sizes: crops are fixed-size anyway
        paths.append(p)
    mc = multicrop_preset("small")
    dl = torch.utils.data.DataLoader(_PngSet(paths, mc), batch_size=4, num_workers=0,
                                     collate_fn=partial(collate_dino, patch_size=14))
    torch.manual_seed(0); random.seed(0)
    b = next(iter(dl))
    assert b["global_crops"].shape == (8, 3, 112, 112) and b["local_crops"].shape == (16, 3, 56, 56)
    assert b["masks"].shape == (8, 64) and (b["masks"].sum(1) > 0).sum() == 4
    assert torch.isfinite(b["global_crops"]).all()
    # different images give different crops, and the batch is reproducible from the seeds
    assert not torch.equal(b["global_crops"][0], b["global_crops"][1])
    torch.manual_seed(0); random.seed(0)
    b2 = next(iter(dl))
    assert torch.equal(b["global_crops"], b2["global_crops"]) and torch.equal(b["masks"], b2["masks"])


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 12), side=st.integers(4, 20), lo=st.floats(0.0, 0.5), span=st.floats(0.0, 0.5),
       prob=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_collate_masks_fuzz(B, side, lo, span, prob, seed):
    hi = min(1.0, lo + span)
    rng = random.Random(seed)
    gen = MaskingGenerator((side, side), max_num_patches=_reference_block_cap(side * 14, 14), rng=rng)
    samples = [{"global_crops": [torch.zeros(1, 1, 1)] * 2, "local_crops": [torch.zeros(1, 1, 1)]} for _ in range(B)]
    b = collate_dino(samples, mask_ratio_min_max=(lo, hi), mask_probability=prob, mask_generator=gen, rng=rng)
    N = side * side
    per = b["masks"].sum(1)
    n_masked = int(2 * B * prob)
    assert (per > 0).sum() <= n_masked                          # never more masked crops than the rule allows
    assert per.max() <= int(N * hi) if n_masked else per.max() == 0
    assert b["n_masked_patches"] == int(per.sum()) <= b["upperbound"]
    assert b["mask_indices"].shape == b["mask_weights"].shape == (b["n_masked_patches"],)
    # per crop, the weights of its masked tokens sum to 1
    crop_of = b["mask_indices"] // N
    sums = torch.zeros(2 * B).index_add_(0, crop_of, b["mask_weights"])
    assert torch.allclose(sums[per > 0], torch.ones(int((per > 0).sum())))


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 80), w=st.integers(1, 80), seed=st.integers(0, 100))
def test_multicrop_any_image_size(h, w, seed):
    """Tiny, thin or odd-sized images still give crops of the requested size (upsampling if needed)."""
    img = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    out = MultiCrop(global_size=28, local_size=14, n_local=2)(img)
    assert [t.shape for t in out["global_crops"]] == [(3, 28, 28)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, 14, 14)] * 2
    assert all(torch.isfinite(t).all() for t in out["global_crops"] + out["local_crops"])


@pytest.mark.parametrize("bad,msg", [(np.zeros((8, 8), np.float32), "uint8"), (np.zeros((0, 8), np.uint8), "empty"),
                                     (Image.new("I;16", (8, 8)), "8-bit"), ("no/such/file.png", "no/such/file.png")])
def test_bad_inputs_name_the_problem(bad, msg):
    with pytest.raises((ValueError, TypeError), match=msg.replace(".", r"\.")):
        MultiCrop(global_size=28, local_size=14, n_local=1)(bad)
