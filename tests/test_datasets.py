"Each data set adapter on a tiny fake replica of its official layout, built inside the test."
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from xr0_lib.data.manifest import ManifestError, load_manifest, validate_manifest, check_leakage
from xr0_lib.data import datasets as D


def png(path: Path, h=8, w=8, v=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), v, np.uint8)).save(path)


def load(root, adapter, **options):
    "Through the YAML route, as a user would, then validated."
    df = load_manifest({"name": adapter, "root": str(root), "adapter": adapter, "options": options,
                        "split_policy": {"type": "val_from_train", "val": 0.3}})
    return df


def test_chexpert(tmp_path):
    rows = []
    for p in range(4):
        for view, fl in (("view1_frontal", "Frontal"), ("view2_lateral", "Lateral")):
            rows.append({"Path": f"CheXpert-v1.0-small/train/patient{p:05d}/study1/{view}.jpg", "Sex": "Female", "Age": 50 + p,
                         "Frontal/Lateral": fl, "AP/PA": "AP" if fl == "Frontal" else "",
                         "Atelectasis": [-1, 1, None, 0][p], "Cardiomegaly": [-1, 0, 1, None][p], "Consolidation": None,
                         "Edema": 1, "Pleural Effusion": [-1, None, 0, 1][p], "No Finding": None})
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows[:2]).assign(Path=lambda t: t.Path.str.replace("train/patient00000", "valid/patient00064")).to_csv(tmp_path / "valid.csv", index=False)
    for r in rows + [{"Path": "x/valid/patient00064/study1/view1_frontal.jpg"}, {"Path": "x/valid/patient00064/study1/view2_lateral.jpg"}]:
        png(tmp_path / "/".join(r["Path"].split("/")[1:]))
    df = load(tmp_path, "chexpert")
    assert validate_manifest(df) == []
    assert len(df) == 5 and set(df.view) == {"AP"}                            # frontal only
    tr = df[df.patient_id == "patient00000"].iloc[0]
    assert tr.atelectasis == 1 and tr.cardiomegaly == 0 and tr.pleural_effusion == 1   # GLoRIA: U-ones / U-zeros
    assert df.loc[df.patient_id == "patient00002", "atelectasis"].item() == 0          # blank -> 0
    assert df.loc[df.patient_id == "patient00064", "split"].item() == "test"
    ign = D.chexpert_adapter(tmp_path, policy="ignore", blank="ignore", frontal_only=False)
    assert len(ign) == 10 and np.isnan(ign.atelectasis[0]) and np.isnan(ign.atelectasis[4])
    assert D.chexpert_adapter(tmp_path, policy="zeros").atelectasis[0] == 0
    assert D.chexpert_adapter(tmp_path, policy={"Atelectasis": "ones"}).atelectasis[0] == 1
    assert len(check_leakage(df)) == 0
    with pytest.raises(ManifestError, match="Fracture"): D.chexpert_adapter(tmp_path, labels=["Fracture"])


def test_chexpert_8x200(tmp_path):
    cats = D.CHEXPERT_8x200
    cand = []
    for k, c in enumerate(cats):
        for j in range(2):
            r = {"Path": f"CheXpert-v1.0-small/train/patient{k:03d}{j}/study1/view1_frontal.jpg", **{x: 0.0 for x in D.CHEXPERT_LABELS}}
            r[c] = 1.0; cand.append(r)
    pd.DataFrame(cand).to_csv(tmp_path / "candidate.csv", index=False)
    pd.DataFrame({"Variable": cats, "Path": [f"CheXpert-v1.0-small/train/patient9{k:03d}/study1/view1_frontal.jpg" for k in range(8)]}).to_csv(tmp_path / "query.csv", index=False)
    df = D.chexpert_8x200_adapter(tmp_path)
    assert (df.role == "query").sum() == 8 and (df.role == "candidate").sum() == 16
    assert df[df.role == "candidate"].groupby("category").size().tolist() == [2] * 8
    assert df.image_id.is_unique and set(df.split) == {"test"}
    cand[0]["Edema"] = 1.0; pd.DataFrame(cand).to_csv(tmp_path / "candidate.csv", index=False)
    with pytest.raises(ManifestError, match="row 0.*2 positive"): D.chexpert_8x200_adapter(tmp_path)


def test_mura_and_study_scores(tmp_path):
    imgs, studies = {"train": [], "valid": []}, {"train": [], "valid": []}
    for split, pats in (("train", range(3)), ("valid", range(10, 12))):
        for p in pats:
            for s, lab in ((1, "positive"), (2, "negative")):
                st = f"MURA-v1.1/{split}/XR_WRIST/patient{p:05d}/study{s}_{lab}/"
                studies[split].append((st, int(lab == "positive")))
                for m in (1, 2):
                    imgs[split].append(st + f"image{m}.png"); png(tmp_path / st.replace("MURA-v1.1/", "") / f"image{m}.png")
    for split in ("train", "valid"):
        pd.DataFrame(imgs[split]).to_csv(tmp_path / f"{split}_image_paths.csv", index=False, header=False)
        pd.DataFrame(studies[split]).to_csv(tmp_path / f"{split}_labeled_studies.csv", index=False, header=False)
    df = load(tmp_path, "mura")
    assert validate_manifest(df) == [] and len(df) == 20 and set(df.anatomy) == {"wrist"}
    assert df.groupby("study_id").abnormal.nunique().max() == 1
    assert (df[df.study_id.str.contains("positive")].abnormal == 1).all()
    assert set(df[df.patient_id.isin(["patient00010", "patient00011"])].split) == {"test"}
    sc = D.study_scores(df, np.arange(len(df)), how="max", label="abnormal")
    assert len(sc) == 10 and set(sc.label) == {0.0, 1.0}
    first = df.study_id.iloc[0]
    assert sc.set_index("study_id").score[first] == np.flatnonzero(df.study_id == first).max()
    mean = D.study_scores(df, np.arange(len(df)), how="mean").set_index("study_id").score[first]
    assert mean == np.flatnonzero(df.study_id == first).mean()
    pd.DataFrame(studies["valid"][1:]).to_csv(tmp_path / "valid_labeled_studies.csv", index=False, header=False)
    with pytest.raises(ManifestError, match="no label"): D.mura_adapter(tmp_path)


def test_nih(tmp_path):
    names = [f"0000000{p}_00{k}.png" for p in range(1, 5) for k in range(2)]
    for i, n in enumerate(names): png(tmp_path / f"images_00{1 + i % 2}" / "images" / n)
    labels = ["Effusion|Infiltration", "No Finding", "Pleural_Thickening", "Cardiomegaly", "No Finding", "Mass|Nodule", "Hernia", "No Finding"]
    pd.DataFrame({"Image Index": names, "Finding Labels": labels, "Patient ID": [n[:8].lstrip("0") for n in names],
                  "View Position": "PA", "Patient Gender": "M", "Patient Age": 40}).to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[:6]))
    (tmp_path / "test_list.txt").write_text("\n".join(names[6:]))
    pd.DataFrame({"Image Index": [names[0]], "Finding Label": ["Infiltrate"], "Bbox [x": [10], "y": [20], "w": [30], "h]": [40]}).to_csv(tmp_path / "BBox_List_2017.csv", index=False)
    df = load(tmp_path, "nih")
    assert validate_manifest(df) == [] and len(df) == 8
    assert df.effusion[0] == 1 and df.infiltration[0] == 1 and df.pleural_thickening[0] == 0    # exact tokens
    assert df.pleural_thickening[2] == 1 and df.effusion[2] == 0 and df.no_finding[1] == 1
    assert json.loads(df.boxes[0]) == [{"label": "Infiltration", "x0": 10.0, "y0": 20.0, "x1": 40.0, "y1": 60.0}]
    assert set(df.split[6:]) == {"test"} and len(check_leakage(df)) == 0
    pd.DataFrame({"Image Index": names[:1], "Finding Labels": ["Effusionn"], "Patient ID": ["1"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ManifestError, match="Effusionn"): D.nih_adapter(tmp_path, csv="bad.csv")


def test_siim_acr(tmp_path):
    m = np.zeros((16, 16), np.uint8); m[3:6, 4:9] = 1; m2 = np.zeros_like(m); m2[10:12, 1:3] = 1
    rle = pd.DataFrame({"ImageId": ["1.2.3", "1.2.3", "1.2.4"], " EncodedPixels": [" " + D.rle_encode_siim(m), " " + D.rle_encode_siim(m2), "-1"]})
    rle.to_csv(tmp_path / "train-rle.csv", index=False)
    png(tmp_path / "dicom-images-train" / "a" / "1.2.3.png", 16, 16); png(tmp_path / "dicom-images-train" / "b" / "1.2.4.png", 16, 16)
    df = load(tmp_path, "siim_acr", size=16)
    assert len(df) == 2 and df.pneumothorax.tolist() == [1.0, 0.0]
    ds = D.XrayDataset(df, payload=("mask",))
    s = ds[0]
    assert s["mask_classes"] == ["pneumothorax"] and torch.equal(s["mask"][0], torch.from_numpy(m | m2))
    assert ds[1]["mask"].sum() == 0
    rle.iloc[:2].to_csv(tmp_path / "stage2.csv", index=False); rle.iloc[2:].to_csv(tmp_path / "tr.csv", index=False)
    t = D.siim_acr_adapter(tmp_path, csv="tr.csv", test_csv="stage2.csv", size=16)
    assert dict(zip(t.image_id, t.split)) == {"1.2.4": "train", "1.2.3": "test"}


def test_chexmask(tmp_path):
    lung = np.zeros((12, 10), np.uint8); lung[2:9, 1:4] = 1; heart = np.zeros_like(lung); heart[5:10, 4:8] = 1
    pd.DataFrame({"dicom_id": ["abc", "low"], "Dice RCA (Mean)": [0.9, 0.5], "Left Lung": [D.rle_encode_chexmask(lung)] * 2,
                  "Right Lung": [D.rle_encode_chexmask(lung[:, ::-1])] * 2, "Heart": [D.rle_encode_chexmask(heart)] * 2,
                  "Height": 12, "Width": 10}).to_csv(tmp_path / "mimic.csv", index=False)
    png(tmp_path / "files" / "abc.jpg", 12, 10); png(tmp_path / "files" / "low.jpg", 12, 10)
    df = load_manifest({"name": "chexmask", "root": str(tmp_path), "adapter": "chexmask",
                        "options": {"csv": "mimic.csv", "path_template": "files/{}.jpg"}, "split_policy": {"type": "patient_hash"}})
    assert df.image_id.tolist() == ["abc"]                                  # quality filter
    s = D.XrayDataset(df, payload=("mask",))[0]
    assert s["mask_classes"] == ["left_lung", "right_lung", "heart"]
    assert torch.equal(s["mask"][0], torch.from_numpy(lung)) and torch.equal(s["mask"][2], torch.from_numpy(heart))
    assert torch.equal(s["mask"][1], torch.from_numpy(lung[:, ::-1].copy()))
    assert len(D.chexmask_adapter(tmp_path, "mimic.csv", min_dice=None)) == 2


IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><meta type="rr"/><uId id="CXR{n}"/>
<MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText><AbstractText Label="INDICATION">Cough</AbstractText>
<AbstractText Label="FINDINGS">{f}</AbstractText><AbstractText Label="IMPRESSION">No acute disease.</AbstractText>
</Abstract></Article></MedlineCitation>
<MeSH><major>normal</major></MeSH>
{imgs}
</eCitation>"""


def test_iu_xray(tmp_path):
    (tmp_path / "ecgen-radiology").mkdir()
    for n, f, k in ((1, "The heart is normal in size.", 2), (2, "", 1)):
        imgs = "\n".join(f'<parentImage id="CXR{n}_1_IM-000{n}-{j}"><url>x</url></parentImage>' for j in range(k))
        (tmp_path / "ecgen-radiology" / f"{n}.xml").write_text(IU_XML.format(n=n, f=f, imgs=imgs))
        for j in range(k): png(tmp_path / "images" / f"CXR{n}_1_IM-000{n}-{j}.png")
    (tmp_path / "annotation.json").write_text(json.dumps({"train": [{"id": "CXR1_1_IM-0001", "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"]}],
                                                          "val": [], "test": [{"id": "CXR2_1_IM-0002", "image_path": ["CXR2_1_IM-0002/0.png"]}]}))
    df = load_manifest({"name": "iu", "root": str(tmp_path), "adapter": "iu_xray", "options": {"annotation": "annotation.json"}})
    assert len(df) == 3 and df.patient_id.tolist() == ["CXR1", "CXR1", "CXR2"]
    assert df.report[0] == "The heart is normal in size. No acute disease." and df.impression[2] == "No acute disease."
    assert pd.isna(df.findings[2]) and df.mesh[0] == "normal"
    assert df.split.tolist() == ["train", "train", "test"]
    assert D.XrayDataset(df, payload=("report",))[0]["report"].startswith("The heart")
    (tmp_path / "images" / "CXR2_1_IM-0002-0.png").unlink()
    with pytest.raises(ManifestError, match="CXR2_1_IM-0002-0.png"): D.iu_xray_adapter(tmp_path)
    assert len(D.iu_xray_adapter(tmp_path, drop_missing=True)) == 2


def test_ms_cxr(tmp_path):
    p = "files/p10/p10000032/s50414267/d1.jpg"
    pd.DataFrame({"dicom_id": ["d1", "d1", "d2"], "category_name": ["Pneumonia", "Edema", "Cardiomegaly"],
                  "label_text": ["left basal opacity", "mild edema", "enlarged heart"], "path": [p, p, "files/p11/p11000011/s1/d2.jpg"],
                  "x": [10, 20, 5], "y": [10, 30, 5], "w": [5, 5, 50], "h": [8, 8, 40], "image_width": 100, "image_height": 90,
                  "split": ["train", "train", "test"]}).to_csv(tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv", index=False)
    png(tmp_path / p); png(tmp_path / "files/p11/p11000011/s1/d2.jpg")
    df = load_manifest({"name": "ms_cxr", "root": str(tmp_path), "adapter": "ms_cxr", "split_policy": {"type": "patient_hash", "val": 0, "test": 0.5}})
    assert df.patient_id.tolist() == ["p10000032", "p11000011"] and df.official_split.tolist() == ["train", "test"]
    ph = json.loads(df.phrases[0])
    assert [x["phrase"] for x in ph] == ["left basal opacity", "mild edema"] and ph[0]["box"] == [10.0, 10.0, 15.0, 18.0]
    assert validate_manifest(df) == []
    s = D.XrayDataset(df, payload=("phrases", "boxes"))[0]
    assert len(s["phrases"]) == 2 and s["boxes"].shape == (2, 4) and s["box_labels"] == ["Pneumonia", "Edema"]


def test_vindr_cxr(tmp_path):
    rows = [("a", "Cardiomegaly", 3, "R1", 1, 1, 5, 5), ("a", "Cardiomegaly", 3, "R2", 1, 1, 6, 6), ("a", "Nodule/Mass", 8, "R3", 2, 2, 3, 3),
            ("b", "No finding", 14, "R1", None, None, None, None), ("b", "No finding", 14, "R2", None, None, None, None)]
    pd.DataFrame(rows, columns=["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]).to_csv(tmp_path / "train.csv", index=False)
    png(tmp_path / "train" / "a.png"); png(tmp_path / "train" / "b.png")
    df = load(tmp_path, "vindr_cxr")
    a = df.set_index("image_id").loc["a"]
    assert a.cardiomegaly == 1 and a.nodule_mass == 1 and a.no_finding == 0 and len(json.loads(a.boxes)) == 3
    assert df.set_index("image_id").loc["b"].no_finding == 1 and pd.isna(df.set_index("image_id").loc["b"].boxes)
    maj = D.vindr_cxr_adapter(tmp_path, fusion="majority").set_index("image_id").loc["a"]
    assert maj.cardiomegaly == 1 and maj.nodule_mass == 0                     # 1 of 3 readers is no majority
    assert validate_manifest(df) == []


def test_rsna_pneumonia(tmp_path):
    pd.DataFrame({"patientId": ["p1", "p1", "p2"], "x": [10, 50, None], "y": [10, 20, None], "width": [5, 6, None],
                  "height": [7, 8, None], "Target": [1, 1, 0]}).to_csv(tmp_path / "stage_2_train_labels.csv", index=False)
    png(tmp_path / "stage_2_train_images" / "p1.png"); png(tmp_path / "stage_2_train_images" / "p2.png")
    df = load_manifest({"name": "rsna", "root": str(tmp_path), "adapter": "rsna_pneumonia", "split_policy": {"type": "patient_hash"}})
    assert df.pneumonia.tolist() == [1.0, 0.0] and len(json.loads(df.boxes[0])) == 2 and pd.isna(df.boxes[1])
    assert json.loads(df.boxes[0])[1] == {"label": "Lung Opacity", "x0": 50.0, "y0": 20.0, "x1": 56.0, "y1": 28.0}
    assert set(df.split) <= {"train", "val", "test"}


def test_bone_fracture(tmp_path):
    (tmp_path / "data.yaml").write_text("names: ['elbow positive', 'fingers positive', 'forearm fracture', 'humerus fracture', 'humerus', 'shoulder fracture', 'wrist positive']\nnc: 7\n")
    def add(folder, stem, lines, w=200, h=100):
        png(tmp_path / folder / "images" / f"{stem}.jpg", h, w)
        (tmp_path / folder / "labels").mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "labels" / f"{stem}.txt").write_text("\n".join(lines))
    add("train", "image1_1002_png.rf.aaa", ["2 0.5 0.5 0.2 0.4"])
    add("train", "image1_1002_png.rf.bbb", ["6 0.1 0.1 0.3 0.1 0.3 0.5 0.1 0.5 0.1 0.1"])      # a polygon line
    add("valid", "image1_1002_png.rf.ccc", [])
    add("test", "image9_png.rf.ddd", [])
    df = load_manifest({"name": "bone", "root": str(tmp_path), "adapter": "bone_fracture"})
    b = json.loads(df.boxes[0])[0]
    assert b["label"] == "forearm fracture" and (b["x0"], b["y0"], b["x1"], b["y1"]) == pytest.approx((80, 30, 120, 70))
    b = json.loads(df.boxes[1])[0]
    assert b["label"] == "wrist positive" and (b["x0"], b["y0"], b["x1"], b["y1"]) == pytest.approx((20, 10, 60, 50))
    assert df.fracture.tolist() == [1.0, 1.0, 0.0, 0.0] and df.forearm_fracture[0] == 1 and df.wrist_positive[1] == 1
    lk = check_leakage(df)                                    # augmented copies of one source across splits
    assert lk.patient_id.tolist() == ["image1_1002_png"]
    re = D.bone_fracture_adapter(tmp_path, regroup=True)
    assert set(re[re.patient_id == "image1_1002_png"].split) == {"train"} and len(check_leakage(re.assign(abs_path=""))) == 0
    (tmp_path / "train" / "labels" / "image1_1002_png.rf.aaa.txt").write_text("2 0.5 0.5")
    with pytest.raises(ManifestError, match="image1_1002_png.rf.aaa.txt:1"): D.bone_fracture_adapter(tmp_path)


def test_every_yaml_names_a_registered_adapter_with_valid_options():
    import inspect, yaml
    ydir = Path(__file__).resolve().parents[1] / "data_manifests"
    files = [f for f in sorted(ydir.glob("*.yaml")) if f.name != "phantom.yaml"]
    assert len(files) >= 11
    for f in files:
        spec = yaml.safe_load(f.read_text())
        for k in ("name", "citation", "licence", "anatomy", "tasks", "split_policy", "adapter"):
            assert k in spec, (f.name, k)
        fn = D.ADAPTERS[spec["adapter"]]
        inspect.signature(fn).bind("ROOT", **(spec.get("options") or {}))   # unknown option names fail here
        from xr0_lib.data.manifest import normalize_tasks
        normalize_tasks(spec["tasks"], f.name)
