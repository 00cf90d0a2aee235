"""Phrase grounding (eval.grounding, experiments/grounding): IoU metrics against torchvision, phrase JSON parsing
(several boxes, malformed rows), the loss, padding, which parts train, learning a grounding that beats the
finding-mean-box baseline on a synthetic task, the paired Δ against a reference, an MS-CXR-shaped set through the
`ms_cxr` adapter, and the experiment end to end through papermill."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss

from xr0_lib.eval.grounding import (GroundConfig, GroundingModel, finding_mean_boxes, finding_mean_predict, grounding_delta, grounding_loss,
                                    grounding_metrics, grounding_pairs, pair_iou, predict_grounding, train_grounding)
from xr0_lib.eval.text import TextConfig, text_encoder
from xr0_lib.experiments import run_experiment

torch.set_num_threads(1)


def random_boxes(g, n):
    xy = torch.rand(n, 2, generator=g) * 50
    return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * 30], 1).double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_metrics_equal_torchvision_box_iou(seed):
    g = torch.Generator().manual_seed(seed)
    p, t = random_boxes(g, 40), random_boxes(g, 40)
    t[:5] = p[:5]                                              # some exact hits
    ref = box_iou(p, t).diagonal().numpy()
    np.testing.assert_allclose(pair_iou(p.numpy(), t.numpy()), ref, rtol=1e-12)
    m = grounding_metrics(p.numpy(), t.numpy(), n_boot=20).set_index("metric")
    assert m.loc["miou", "value"] == pytest.approx(ref.mean())
    assert m.loc["acc@0.5", "value"] == pytest.approx(np.mean(ref > 0.5))


def test_acc_counts_iou_strictly_above_half():
    p, t = np.array([[0, 0, 10, 10.]]), np.array([[0, 0, 10, 5.]])           # IoU exactly 0.5
    assert pair_iou(p, t)[0] == 0.5
    assert grounding_metrics(p, t, n_boot=5).set_index("metric").loc["acc@0.5", "value"] == 0.0


def test_bootstrap_resamples_whole_studies():
    p = np.array([[0, 0, 10, 10.]] * 4); t = np.array([[0, 0, 10, 10.], [0, 0, 10, 10.], [20, 20, 30, 30.], [20, 20, 30, 30.]])
    m = grounding_metrics(p, t, groups=["a", "a", "b", "b"], n_boot=200).set_index("metric")
    # two studies, one all hits and one all misses: every resample's mean is 0, 0.5 or 1
    assert m.loc["miou", "ci_low"] == 0.0 and m.loc["miou", "ci_high"] == 1.0


def test_malformed_phrase_json_is_reported_with_its_row_and_skipped():
    good = json.dumps([{"phrase": "small left pleural effusion", "box": [1, 2, 8, 9]}])
    df = pd.DataFrame(dict(image_id=list("abcdefg"), split=["train"] * 7, phrases=[
        good, "{not json", json.dumps({"phrase": "x"}), json.dumps([{"box": [1, 1, 2, 2]}]),
        json.dumps([{"phrase": "nodule", "box": [1, 1, "a", 2]}, {"phrase": "nodule", "box": [3, 3, 5, 5]}]),
        json.dumps([{"phrase": "nodule", "box": [1, 1, float("inf"), 2]}]), None]))
    pairs, skipped = grounding_pairs(df)
    assert list(pairs.image_id) == ["a", "e"] and pairs.box[1] == [3.0, 3.0, 5.0, 5.0]
    assert list(skipped.row) == [1, 2, 3, 4, 5]                     # row 6 has no phrases: nothing to skip
    reasons = dict(zip(skipped.row, skipped.reason))
    assert "does not parse" in reasons[1] and "not a list" in reasons[2] and "no phrase" in reasons[3]
    assert "not numeric" in reasons[4] and "not finite" in reasons[5]


def test_several_boxes_of_one_phrase_union_or_each():
    e = [{"phrase": "fracture of the radius", "box": [1, 2, 5, 6]}, {"phrase": "fracture of the radius", "box": [4, 1, 9, 3]}]
    df = pd.DataFrame(dict(image_id=["a"], split=["train"], phrases=[json.dumps(e)]))
    u = grounding_pairs(df)[0]
    assert len(u) == 1 and u.box[0] == [1.0, 1.0, 9.0, 6.0] and u.n_boxes[0] == 2 and u.finding[0] == "fracture"
    each = grounding_pairs(df, multi_box="each")[0]
    assert [b for b in each.box] == [[1.0, 2.0, 5.0, 6.0], [4.0, 1.0, 9.0, 3.0]]


def test_loss_is_l1_plus_giou():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(6, 4, generator=g) * 0.4 + 0.2
    tgt = box_convert(torch.rand(6, 4, generator=g) * 0.3 + torch.tensor([0.3, 0.3, 0.2, 0.2]), "cxcywh", "xyxy")
    ref = 5 * (pred - box_convert(tgt, "xyxy", "cxcywh")).abs().mean() + 2 * generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"), tgt).mean()
    torch.testing.assert_close(grounding_loss(pred, tgt), ref)


def test_padding_does_not_change_the_box():
    torch.manual_seed(0)
    m = GroundingModel(8, 16, width=16, layers=2, heads=2).eval()
    patches, text = torch.randn(1, 3, 3, 8), torch.randn(1, 4, 16)
    a = m(patches, text, torch.ones(1, 4, dtype=torch.long))
    b = m(patches, torch.cat([text, torch.randn(1, 3, 16)], 1), torch.tensor([[1, 1, 1, 1, 0, 0, 0]]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def synthetic(n, seed, grid=4, dim=8):
    "Two objects per image at random cells (channel 0: nodule, channel 1: effusion); the phrase names one, its cell is the box."
    g = np.random.default_rng(seed)
    patches = torch.zeros(n, grid, grid, dim); phrases, boxes, findings = [], [], []
    for i in range(n):
        cells = g.choice(grid * grid, 2, replace=False)
        for c, cell in enumerate(cells): patches[i, cell // grid, cell % grid, c] = 3.0
        k = int(g.integers(2)); r, c = divmod(int(cells[k]), grid)
        phrases.append(["small nodule", "pleural effusion"][k]); findings.append(["nodule", "pleural_effusion"][k])
        boxes.append([c / grid, r / grid, (c + 1) / grid, (r + 1) / grid])
    patches += 0.1 * torch.randn(patches.shape, generator=torch.Generator().manual_seed(seed))
    return dict(patches=patches, images=None, index=np.arange(n), boxes=np.array(boxes), phrases=phrases, findings=findings,
                groups=np.arange(n))


def test_grounding_learns_beyond_the_finding_mean_box():
    tr, te = synthetic(256, 0), synthetic(64, 1)
    tok, tm = text_encoder(TextConfig(vocab_size=60, hidden_size=16, intermediate_size=32), tr["phrases"])
    torch.manual_seed(0)
    m = GroundingModel(8, 16, width=32, layers=2, heads=2)
    train_grounding(m, tm, tok, tr, GroundConfig(epochs=40, batch_size=32, lr=3e-3, trainable="fusion"))
    got = grounding_metrics(predict_grounding(m, tm, tok, te), te["boxes"], n_boot=50).set_index("metric")
    base = grounding_metrics(finding_mean_predict(finding_mean_boxes(tr["findings"], tr["boxes"]), te["findings"]), te["boxes"],
                             n_boot=50).set_index("metric")
    assert got.loc["miou", "ci_low"] > base.loc["miou", "ci_high"], (got, base)
    assert got.loc["acc@0.5", "value"] > 0.5


@pytest.mark.parametrize("trainable,changes", [("fusion", {"fusion"}), ("fusion+text", {"fusion", "text"}), ("mapping", {"image_map"})])
def test_trainable_parts(trainable, changes):
    tr = synthetic(16, 0)
    tok, tm = text_encoder(TextConfig(vocab_size=60, hidden_size=16, intermediate_size=32), tr["phrases"])
    m = GroundingModel(8, 16, width=16, layers=1, heads=2)
    before = {"text": [p.clone() for p in tm.parameters()], "image_map": [p.clone() for p in m.image_map.parameters()],
              "fusion": [p.clone() for p in m.blocks.parameters()]}
    train_grounding(m, tm, tok, tr, GroundConfig(epochs=1, batch_size=8, trainable=trainable))
    after = {"text": list(tm.parameters()), "image_map": list(m.image_map.parameters()), "fusion": list(m.blocks.parameters())}
    moved = {k for k in before if any(not torch.equal(a, b) for a, b in zip(before[k], after[k]))}
    assert moved == changes | ({"image_map"} if trainable != "mapping" else set()), moved
    with pytest.raises(ValueError, match="trainable"):
        train_grounding(m, tm, tok, tr, GroundConfig(trainable="all"))     # 'all' needs the backbone and images


def test_grounding_experiment_tiny(tmp_path):
    params = dict(n_images=60, image_size=56, input_size=56, epochs=2, layers=1, width=32, text_hidden=32, n_boot=20, n_figure=2,
                  torch_threads=1)
    res = run_experiment("grounding", tmp_path, params, timeout=300)
    tidy = pd.DataFrame(res["metrics"])
    assert {"task", "backbone", "metric", "value", "ci_low", "ci_high"} <= set(tidy.columns)
    assert set(tidy.metric) == {"acc@0.5", "miou"} and set(tidy.backbone) == {"xr0-vitp14", "finding mean box"}
    assert (tmp_path / "grounding_boxes.png").is_file() and (tmp_path / "skipped_phrases.csv").is_file()


def test_paired_delta_uses_shared_study_resamples():
    g = torch.Generator().manual_seed(0)
    t = random_boxes(g, 60).numpy()
    good, bad = t + np.random.default_rng(0).normal(0, 1, t.shape), random_boxes(g, 60).numpy()
    groups = np.repeat(np.arange(20), 3)
    d = grounding_delta(good, bad, t, groups=groups, n_boot=200, seed=3).set_index("metric")
    a = grounding_metrics(good, t, groups=groups, n_boot=200, seed=3).set_index("metric")
    b = grounding_metrics(bad, t, groups=groups, n_boot=200, seed=3).set_index("metric")
    for m in ("miou", "acc@0.5"):
        assert d.loc[m, "delta"] == pytest.approx(a.loc[m, "value"] - b.loc[m, "value"])
        assert d.loc[m, "delta_ci_low"] > 0 and d.loc[m, "delta_p"] < 0.05
    rev = grounding_delta(bad, good, t, groups=groups, n_boot=200, seed=3).set_index("metric")
    assert rev.loc["miou", "delta_ci_high"] == pytest.approx(-d.loc["miou", "delta_ci_low"])   # same resamples, sign flipped


def _ms_cxr_shaped(root, n=36, size=64):
    "A small MS-CXR-shaped set: MIMIC-style paths (files/pNN/pNNNNNNNN/sNN/ID.png), the MS-CXR CSV columns, a bright box per phrase."
    g = np.random.default_rng(0); rows = []
    for i in range(n):
        did, pid = f"d{i:03d}", f"p1{i:07d}"
        path = f"files/p1{i % 3}/{pid}/s{i:08d}/{did}.png"
        img = (g.random((size, size)) * 40).astype(np.uint8)
        cat, text = [("Pleural effusion", "right pleural effusion"), ("Pneumonia", "left lower lobe opacity")][i % 2]
        x, y = (4, 30) if i % 2 == 0 else (34, 30)
        w, h = int(g.integers(16, 26)), int(g.integers(16, 28))
        img[y:y + h, x:x + w] = 220
        (root / path).parent.mkdir(parents=True, exist_ok=True); Image.fromarray(img).save(root / path)
        rows.append(dict(dicom_id=did, category_name=cat, label_text=text, path=path, x=x, y=y, w=w, h=h, image_width=size,
                         image_height=size, split="train"))
    pd.DataFrame(rows).to_csv(root / "MS_CXR_Local_Alignment_v1.1.0.csv", index=False)
    (root / "ms_cxr.yaml").write_text(f"name: ms_cxr\nroot: {root}\nadapter: ms_cxr\ntasks: {{}}\n"
                                      "split_policy: {type: patient_hash, val: 0.0, test: 0.3, seed: 0}\n")
    return root / "ms_cxr.yaml"


def test_ms_cxr_adapter_feeds_grounding(tmp_path):
    from xr0_lib.data.manifest import load_manifest
    yaml = _ms_cxr_shaped(tmp_path)
    df = load_manifest(yaml)
    pairs, skipped = grounding_pairs(df)
    assert len(pairs) == 36 and skipped.empty
    assert set(pairs.finding) == {"Pleural effusion", "Pneumonia"}          # MS-CXR's category_name is the finding
    assert set(pairs.split) <= {"train", "test"} and (pairs.split == "test").any()
    first = pairs.iloc[0]
    raw = json.loads(df.phrases.iat[int(first.row)])[0]
    assert first.box == raw["box"] and first.phrase == raw["phrase"]
    out = tmp_path / "run"
    params = dict(manifest=str(yaml), input_size=56, epochs=2, layers=1, width=32, text_hidden=32, n_boot=20, n_figure=2,
                  fractions=[1.0], torch_threads=1)
    res = run_experiment("grounding", out, params, timeout=300)
    tidy = pd.DataFrame(res["metrics"])
    assert set(tidy.backbone) == {"xr0-vitp14", "finding mean box"}
    assert tidy.n.iloc[0] == (pairs.split == "test").sum()
    model = tidy[tidy.backbone == "xr0-vitp14"].set_index("metric")
    assert {"delta", "delta_ci_low", "delta_ci_high"} <= set(model.columns) and model.loc["miou", "reference"] == "finding mean box"
