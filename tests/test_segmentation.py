"""Segmentation on a frozen backbone, end to end: Dice against MONAI and torchmetrics (empty masks included), a head
overfitting a few phantom images, both mask shapes of a manifest giving the same result, masks at half resolution,
broken mask rows reported and skipped, and the experiment on a CSV data set with per-class masks through a YAML."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from xr0_lib.data.manifest import load_manifest
from xr0_lib.data.masks import class_masks
from xr0_lib.data.phantom import LABEL_ID, make_phantom_dataset
from xr0_lib.eval.segmentation import (SegConfig, SegData, SegTask, compare_segmentation, dice_scores, fit_segmentation,
                                       load_seg_data, make_head, mean_dice, predict_masks, seg_task)
from xr0_lib.experiments import run_experiment
from xr0_lib.models.backbones import load_backbone, preprocess_config

LUNG_HEART = dict(classes=["lungs", "heart"], filters={"anatomy": ["chest"], "view": ["frontal"]})


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    "A phantom set at 56 px with every fourth row moved to test and val so that each split has frontal chests."
    d = tmp_path_factory.mktemp("ph")
    df = load_manifest(make_phantom_dataset(d, n=160, size=56, seed=0, show_progress=False))
    fc = (df.anatomy == "chest") & (df.view == "frontal")
    df.loc[fc, "split"] = np.array(["train", "train", "val", "test"])[np.arange(fc.sum()) % 4]
    return df


def test_dice_matches_monai_and_torchmetrics():
    from monai.metrics import DiceMetric
    from torchmetrics.segmentation import DiceScore
    g = torch.Generator().manual_seed(0)
    truth = (torch.rand(6, 3, 16, 16, generator=g) > 0.6).to(torch.uint8)
    pred = (torch.rand(6, 3, 16, 16, generator=g) > 0.5).to(torch.uint8)
    truth[0, 1] = 0; pred[0, 1] = 0          # both empty: excluded
    truth[1, 2] = 0                          # empty truth, non-empty prediction: 0
    ours = dice_scores(pred, truth)
    assert np.isnan(ours[0, 1]) and ours[1, 2] == 0.0
    dm = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    ref = dm(pred.float(), truth.float()).numpy()
    has = truth.bool().flatten(2).any(-1).numpy()
    np.testing.assert_allclose(ours[has], ref[has], rtol=1e-6)
    ts = DiceScore(num_classes=3, include_background=True, average="none", aggregation_level="samplewise", input_format="one-hot")
    for i in range(6):
        t = ts(pred[i:i + 1].long(), truth[i:i + 1].long()).numpy()
        np.testing.assert_allclose(ours[i][has[i]], t[has[i]], rtol=1e-5)
    # per-image averaging: each image's class mean, then the images
    np.testing.assert_allclose(mean_dice(ours), np.mean([np.nanmean(r) for r in ours]))


@pytest.mark.parametrize("name, iters, goal", [("upernet", 100, 0.95), ("vitdet", 100, 0.9)])
def test_head_overfits_eight_phantom_images(phantom, name, iters, goal):
    torch.set_num_threads(1)
    torch.manual_seed(0)   # the random-init backbone is drawn from the global RNG: fix it, whatever test ran before
    bb = load_backbone("xr0-vitp14", img_size=56)
    task = SegTask("lh", label_column="mask_path", label_values={"lungs": [LABEL_ID["right_lung"], LABEL_ID["left_lung"]],
                                                                 "heart": LABEL_ID["heart"]}, **LUNG_HEART)
    d = load_seg_data(phantom, task, preprocess_config(bb))
    assert len(d) >= 8
    d8 = SegData(d.images[:8], d.masks[:8], d.image_ids[:8], d.classes)
    torch.manual_seed(0)
    head = make_head(name, bb, 2, channels=32)
    r = fit_segmentation(bb, head, d8, d8, SegConfig(lr=3e-3, max_iters=iters, eval_every=20, early_stop=100))
    assert r["best_val_dice"] > goal, r["history"]
    assert mean_dice(dice_scores(predict_masks(bb, head, d8), d8.masks)) > goal


def test_upernet_fused_at_a_coarser_level_keeps_the_output_size_and_overfits(phantom):
    "`fuse=2`: the FPN levels are fused on the ×2 grid (4× fewer pixels for the fusion conv); logits still at the input size."
    from xr0_lib.eval.segmentation import UPerNetSegHead, default_layers
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bb = load_backbone("xr0-vitp14", img_size=56)
    task = SegTask("lh", label_column="mask_path", label_values={"lungs": [LABEL_ID["right_lung"], LABEL_ID["left_lung"]],
                                                                 "heart": LABEL_ID["heart"]}, **LUNG_HEART)
    d = load_seg_data(phantom, task, preprocess_config(bb))
    d8 = SegData(d.images[:8], d.masks[:8], d.image_ids[:8], d.classes)
    torch.manual_seed(0)
    head = UPerNetSegHead(bb.embed_dim, 2, default_layers(len(bb.blocks)), channels=32, fuse=2)
    feats = [torch.randn(3, bb.embed_dim, 4, 4)] * 4
    assert head.fuse == 1 and head(feats, (56, 56)).shape == (3, 2, 56, 56)
    r = fit_segmentation(bb, head, d8, d8, SegConfig(lr=3e-3, max_iters=100, eval_every=20, early_stop=100))
    assert r["best_val_dice"] > 0.9, r["history"]


def _per_class_manifest(df: pd.DataFrame, root: Path, half: bool = False) -> pd.DataFrame:
    "The lungs and heart of the phantom's label maps written as one binary PNG per class (optionally at half size)."
    (root / "cls").mkdir(exist_ok=True)
    out = df.copy()
    for col in ("lung_mask", "heart_mask"): out[col] = pd.Series(np.nan, index=out.index, dtype=object)
    for i, r in df.iterrows():
        if r.anatomy != "chest" or r.view != "frontal": continue
        lab = np.asarray(Image.open(root / r.mask_path))
        for col, vals in (("lung_mask", [2, 3]), ("heart_mask", [5])):
            m = np.isin(lab, vals).astype(np.uint8) * 255
            if half: m = m[::2, ::2]
            p = f"cls/{r.image_id}_{col}.png"; Image.fromarray(m).save(root / p); out.loc[i, col] = p
    return out


def test_label_map_and_per_class_masks_agree(phantom):
    root = Path(phantom.attrs["root"])
    per = _per_class_manifest(phantom, root)
    per.attrs = dict(phantom.attrs)
    lm = SegTask("lh", label_column="mask_path", label_values={"lungs": [2, 3], "heart": 5}, **LUNG_HEART)
    pc = SegTask("lh", mask_columns={"lungs": "lung_mask", "heart": "heart_mask"}, **LUNG_HEART)
    bb = load_backbone("xr0-vitp14", img_size=56)
    a, b = (load_seg_data(x, t, preprocess_config(bb), "train") for x, t in ((phantom, lm), (per, pc)))
    assert len(a) > 2 and a.image_ids == b.image_ids and torch.equal(a.masks, b.masks)
    cfg = SegConfig(lr=1e-2, max_iters=3)
    ra = compare_segmentation({"m": bb}, phantom, [lm], ["linear"], cfg, n_resamples=20)
    rb = compare_segmentation({"m": bb}, per, [pc], ["linear"], cfg, n_resamples=20)
    assert ra.skipped.empty and rb.skipped.empty and len(ra.tidy) == 3, ra.skipped
    pd.testing.assert_frame_equal(ra.tidy.drop(columns="replicates"), rb.tidy.drop(columns="replicates"))


def test_half_resolution_masks_are_resized_nearest(tmp_path):
    lab = np.zeros((64, 48), np.uint8); lab[5:40, 3:20] = 2; lab[30:60, 25:47] = 5
    half = lab[::2, ::2]
    Image.fromarray(half).save(tmp_path / "half.png"); Image.fromarray((half == 5).astype(np.uint8) * 255).save(tmp_path / "h.png")
    row = {"image_id": "a", "lab": "half.png", "heart": "h.png"}
    st = class_masks(row, ["lung", "heart"], 64, 48, tmp_path, label_column="lab", label_values={"lung": 2, "heart": 5})
    up = np.repeat(np.repeat(half, 2, 0), 2, 1)
    assert np.array_equal(st[0], up == 2) and np.array_equal(st[1], up == 5)
    assert np.array_equal(class_masks(row, ["heart"], 64, 48, tmp_path, mask_columns={"heart": "heart"})[0], up == 5)


def test_broken_mask_rows_are_reported_and_skipped(phantom, tmp_path):
    df = phantom.copy(); df.attrs = dict(phantom.attrs)
    rows = df.index[(df.anatomy == "chest") & (df.view == "frontal")][:2]
    root = Path(df.attrs["root"])
    Image.fromarray(np.zeros((20, 56), np.uint8)).save(root / "wrong_aspect.png")
    df.loc[rows[0], "mask_path"] = "masks/missing.png"
    df.loc[rows[1], "mask_path"] = "wrong_aspect.png"
    d = load_seg_data(df, seg_task("organs"), dict(size=56, crop_size=56, mean=[0.5] * 3, std=[0.2] * 3))
    sk = {s["image_id"]: s["reason"] for s in d.skipped}
    assert set(sk) == set(df.loc[rows, "image_id"]), sk
    assert "cannot read mask" in sk[df.loc[rows[0], "image_id"]] and "aspect" in sk[df.loc[rows[1], "image_id"]]
    assert len(d) == ((df.anatomy == "chest") & (df.view == "frontal")).sum() - 2


def _csv_dataset(root: Path, n: int = 24) -> Path:
    "Images at 56 px with per-class binary masks at 112 px (another resolution), a CSV and a YAML for the csv adapter."
    rng = np.random.default_rng(0); rows = []
    for d in ("img", "lung", "heart"): (root / d).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:112, :112]
    for i in range(n):
        cy, cx, r = rng.uniform(35, 75), rng.uniform(35, 75), rng.uniform(15, 25)
        lung = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2)
        heart = (np.abs(yy - cy - r) < 8) & (np.abs(xx - cx) < 10)
        img = 40 + 120 * lung - 30 * heart + rng.normal(0, 8, lung.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((56, 56), Image.BILINEAR).save(root / f"img/{i}.png")
        Image.fromarray(lung.astype(np.uint8) * 255).save(root / f"lung/{i}.png")
        Image.fromarray(heart.astype(np.uint8) * 255).save(root / f"heart/{i}.png")
        rows.append(dict(file=f"img/{i}.png", pid=f"p{i}", part=["train", "train", "val", "test"][i % 4],
                         lung_png=f"lung/{i}.png", heart_png=f"heart/{i}.png"))
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    spec = dict(name="toy_scr", root=".", adapter="csv",
                options=dict(csv="labels.csv", path_column="file", patient_column="pid", split_column="part",
                             keep_columns={"lung_mask": "lung_png", "heart_mask": "heart_png"}),
                segmentation={"organs": dict(classes=["lung", "heart"], mask_columns={"lung": "lung_mask", "heart": "heart_mask"})})
    (root / "toy.yaml").write_text(yaml.safe_dump(spec))
    return root / "toy.yaml"


def test_experiment_on_csv_dataset_with_per_class_masks(tmp_path):
    y = _csv_dataset(tmp_path / "data")
    res = run_experiment("segmentation", tmp_path / "out", dict(manifest=str(y), backbones=["xr0-vitp14"], tasks=["organs"],
                                                                 heads=["linear", "upernet"], input_size=56, max_iters=8, lr=1e-2,
                                                                 channels=16, n_resamples=20, overlay_images=2), timeout=600)
    recs = [r for r in res["metrics"] if r["class"] == "mean"]
    assert {(r["task"], r["head"], r["metric"]) for r in recs} == {("organs", "linear", "dice"), ("organs", "upernet", "dice")}
    for r in res["metrics"]:
        assert {"task", "head", "backbone", "metric", "value", "ci_low", "ci_high", "mode"} <= set(r)
    assert not res["skipped"], res["skipped"]
    out = tmp_path / "out"
    assert (out / "segmentation_table4.md").is_file() and (out / "overlay_organs_upernet.png").is_file() and (out / "dice_organs.png").is_file()
    json.dumps(res)


def test_augment_mode_trains_with_warped_masks(phantom):
    "augment mode runs the frozen backbone on XR-0-augmented batches every step (masks warped nearest)."
    bb = load_backbone("xr0-vitp14", img_size=56)
    d = load_seg_data(phantom, seg_task("organs"), preprocess_config(bb), "train")
    head = make_head("linear", bb, 3)
    r = fit_segmentation(bb, head, d, d, SegConfig(mode="augment", lr=1e-2, max_iters=4, eval_every=2, batch_size=4))
    assert r["mode"] == "augment" and len(r["history"]) == 2 and r["best_val_dice"] >= 0


def test_findings_task_reads_the_phantom_bit_map(phantom):
    "Each class of the `findings` task is its bit of the stored finding map; a mask only where the finding is labelled."
    from xr0_lib.data.phantom import FINDING_BITS, FINDING_MASKS
    t = seg_task("findings")
    d = load_seg_data(phantom, t, dict(size=56, crop_size=56, mean=[0.5] * 3, std=[0.2] * 3))
    chest = phantom[phantom.anatomy == "chest"].set_index("image_id")
    assert d.image_ids == list(chest.index) and d.classes == list(FINDING_MASKS)
    root = Path(phantom.attrs["root"])
    for k, iid in enumerate(d.image_ids):
        fm = np.asarray(Image.open(root / chest.loc[iid, "finding_mask_path"]))
        for c, f in enumerate(FINDING_MASKS):
            assert np.array_equal(d.masks[k, c].numpy(), ((fm & FINDING_BITS[f]) > 0).astype(np.uint8)), (iid, f)
            if d.masks[k, c].any(): assert chest.loc[iid, f] == 1
    assert d.masks[:, 0].sum() > 0                       # some pneumothorax pixels in 160 images


def test_fractions_use_nested_patient_level_subsets_and_saved_splits(phantom, tmp_path):
    "Training sets of 0.25 ⊂ 0.5 ⊂ 1.0 of the train split's patients; a saved fraction_dir gives the same rows as the draw."
    from xr0_lib.data.manifest import make_fraction_splits
    bb = load_backbone("xr0-vitp14", img_size=56)
    cfg = SegConfig(lr=1e-2, max_iters=2)
    kw = dict(heads=["linear"], cfg=cfg, n_resamples=10, fractions=[0.25, 0.5, 1.0], seeds=[0, 1])
    a = compare_segmentation({"m": bb}, phantom, ["bones"], **kw)
    n = a.runs.groupby(["fraction", "seed"]).n_train.first()
    assert n[(0.25, 0)] <= n[(0.5, 0)] <= n[(1.0, 0)] and n[(0.25, 0)] < n[(1.0, 0)]
    assert set(a.tidy.seed.astype(str)) == {"0", "1", "mean"}
    make_fraction_splits(phantom, fractions=[0.25, 0.5, 1.0], seeds=[0, 1], out=tmp_path / "fr")
    b = compare_segmentation({"m": bb}, phantom, ["bones"], fraction_dir=tmp_path / "fr", **kw)
    pd.testing.assert_series_equal(a.runs.n_train, b.runs.n_train)


def test_ptx_multitask_plus_learns_the_pneumothorax(tmp_path):
    "On frontal-chest phantoms the multitask+ head segments pneumothoraces of the training images (Dice on positives)."
    from xr0_lib.eval.multitask import MultitaskHead, PTXConfig, _predict, fit_multitask, ptx_features
    torch.set_num_threads(1)
    df = load_manifest(make_phantom_dataset(tmp_path, n=48, size=112, seed=0, show_progress=False, workers=1,
                                            where={"anatomy": ["chest"], "view": ["frontal"]}))
    bb = load_backbone("xr0-vitp14", img_size=112)   # an 8×8 patch grid: a pneumothorax rim is 1–2 patches wide
    f = ptx_features(bb, df, None)
    assert f.y.sum() >= 4 and (f.masks.flatten(1).amax(1).numpy() <= f.y).all()
    torch.manual_seed(0)
    head = MultitaskHead("multitask_plus", bb.embed_dim)
    fit_multitask(head, f, f, PTXConfig(lr=3e-3, max_epochs=60, patience=100, batch_size=8))
    p, seg = _predict(head, f)
    pos = f.y == 1
    d = dice_scores(seg[pos] > 0.5, f.masks[pos] > 0)
    assert np.nanmean(d) > 0.5, np.nanmean(d)
