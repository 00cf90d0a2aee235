"""Every public-set adapter reads a tiny fake replica of its official layout into a valid common table
(through its shipped YAML where the defaults must fit), and the masks, boxes and reports it stores decode."""
import gzip
import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as coco_mask

from xr0_lib.data import adapters as A
from xr0_lib.data.dataset import XrayDataset
from xr0_lib.data.manifest import ADAPTERS, ManifestError, load_manifest, validate_manifest, check_leakage, normalize_tasks
from xr0_lib.data.masks import rle_encode_chexmask, rle_encode_siim

YAMLS = Path(__file__).resolve().parents[1] / "data_manifests"

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
    ign = A.chexpert_adapter(tmp_path, policy="ignore", blank="ignore", frontal_only=False)
    assert len(ign) == 10 and np.isnan(ign.atelectasis[0]) and np.isnan(ign.atelectasis[4])
    assert A.chexpert_adapter(tmp_path, policy="zeros").atelectasis[0] == 0
    assert A.chexpert_adapter(tmp_path, policy={"Atelectasis": "ones"}).atelectasis[0] == 1
    assert len(check_leakage(df)) == 0
    with pytest.raises(ManifestError, match="Fracture"): A.chexpert_adapter(tmp_path, labels=["Fracture"])


def test_chexpert_8x200(tmp_path):
    cats = A.CHEXPERT_8x200
    cand = []
    for k, c in enumerate(cats):
        for j in range(2):
            r = {"Path": f"CheXpert-v1.0-small/train/patient{k:03d}{j}/study1/view1_frontal.jpg", **{x: 0.0 for x in A.CHEXPERT_LABELS}}
            r[c] = 1.0; cand.append(r)
    pd.DataFrame(cand).to_csv(tmp_path / "candidate.csv", index=False)
    pd.DataFrame({"Variable": cats, "Path": [f"CheXpert-v1.0-small/train/patient9{k:03d}/study1/view1_frontal.jpg" for k in range(8)]}).to_csv(tmp_path / "query.csv", index=False)
    df = A.chexpert_8x200_adapter(tmp_path)
    assert (df.role == "query").sum() == 8 and (df.role == "candidate").sum() == 16
    assert df[df.role == "candidate"].groupby("category").size().tolist() == [2] * 8
    assert df.image_id.is_unique and set(df.split) == {"test"}
    cand[0]["Edema"] = 1.0; pd.DataFrame(cand).to_csv(tmp_path / "candidate.csv", index=False)
    with pytest.raises(ManifestError, match="row 0.*2 positive"): A.chexpert_8x200_adapter(tmp_path)


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
    sc = A.study_scores(df, np.arange(len(df)), how="max", label="abnormal")
    assert len(sc) == 10 and set(sc.label) == {0.0, 1.0}
    first = df.study_id.iloc[0]
    assert sc.set_index("study_id").score[first] == np.flatnonzero(df.study_id == first).max()
    mean = A.study_scores(df, np.arange(len(df)), how="mean").set_index("study_id").score[first]
    assert mean == np.flatnonzero(df.study_id == first).mean()
    pd.DataFrame(studies["valid"][1:]).to_csv(tmp_path / "valid_labeled_studies.csv", index=False, header=False)
    with pytest.raises(ManifestError, match="no label"): A.mura_adapter(tmp_path)


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
    with pytest.raises(ManifestError, match="Effusionn"): A.nih_adapter(tmp_path, csv="bad.csv")


def test_siim_acr(tmp_path):
    m = np.zeros((16, 16), np.uint8); m[3:6, 4:9] = 1; m2 = np.zeros_like(m); m2[10:12, 1:3] = 1
    rle = pd.DataFrame({"ImageId": ["1.2.3", "1.2.3", "1.2.4"], " EncodedPixels": [" " + rle_encode_siim(m), " " + rle_encode_siim(m2), "-1"]})
    rle.to_csv(tmp_path / "train-rle.csv", index=False)
    png(tmp_path / "dicom-images-train" / "a" / "1.2.3.png", 16, 16); png(tmp_path / "dicom-images-train" / "b" / "1.2.4.png", 16, 16)
    df = load(tmp_path, "siim_acr", size=16)
    assert len(df) == 2 and df.pneumothorax.tolist() == [1.0, 0.0]
    ds = XrayDataset(df, payload=("mask",))
    s = ds[0]
    assert s["mask_classes"] == ["pneumothorax"] and torch.equal(s["mask"][0], torch.from_numpy(m | m2))
    assert ds[1]["mask"].sum() == 0
    rle.iloc[:2].to_csv(tmp_path / "stage2.csv", index=False); rle.iloc[2:].to_csv(tmp_path / "tr.csv", index=False)
    t = A.siim_acr_adapter(tmp_path, csv="tr.csv", test_csv="stage2.csv", size=16)
    assert dict(zip(t.image_id, t.split)) == {"1.2.4": "train", "1.2.3": "test"}


def test_chexmask(tmp_path):
    lung = np.zeros((12, 10), np.uint8); lung[2:9, 1:4] = 1; heart = np.zeros_like(lung); heart[5:10, 4:8] = 1
    pd.DataFrame({"dicom_id": ["abc", "low"], "Dice RCA (Mean)": [0.9, 0.5], "Left Lung": [rle_encode_chexmask(lung)] * 2,
                  "Right Lung": [rle_encode_chexmask(lung[:, ::-1])] * 2, "Heart": [rle_encode_chexmask(heart)] * 2,
                  "Height": 12, "Width": 10}).to_csv(tmp_path / "mimic.csv", index=False)
    png(tmp_path / "files" / "abc.jpg", 12, 10); png(tmp_path / "files" / "low.jpg", 12, 10)
    df = load_manifest({"name": "chexmask", "root": str(tmp_path), "adapter": "chexmask",
                        "options": {"csv": "mimic.csv", "path_template": "files/{}.jpg"}, "split_policy": {"type": "patient_hash"}})
    assert df.image_id.tolist() == ["abc"]                                  # quality filter
    s = XrayDataset(df, payload=("mask",))[0]
    assert s["mask_classes"] == ["left_lung", "right_lung", "heart"]
    assert torch.equal(s["mask"][0], torch.from_numpy(lung)) and torch.equal(s["mask"][2], torch.from_numpy(heart))
    assert torch.equal(s["mask"][1], torch.from_numpy(lung[:, ::-1].copy()))
    assert len(A.chexmask_adapter(tmp_path, "mimic.csv", min_dice=None)) == 2


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
    assert XrayDataset(df, payload=("report",))[0]["report"].startswith("The heart")
    (tmp_path / "images" / "CXR2_1_IM-0002-0.png").unlink()
    with pytest.raises(ManifestError, match="CXR2_1_IM-0002-0.png"): A.iu_xray_adapter(tmp_path)
    assert len(A.iu_xray_adapter(tmp_path, drop_missing=True)) == 2


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
    s = XrayDataset(df, payload=("phrases", "boxes"))[0]
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
    maj = A.vindr_cxr_adapter(tmp_path, fusion="majority").set_index("image_id").loc["a"]
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
    re = A.bone_fracture_adapter(tmp_path, regroup=True)
    assert set(re[re.patient_id == "image1_1002_png"].split) == {"train"} and len(check_leakage(re.assign(abs_path=""))) == 0
    (tmp_path / "train" / "labels" / "image1_1002_png.rf.aaa.txt").write_text("2 0.5 0.5")
    with pytest.raises(ManifestError, match="image1_1002_png.rf.aaa.txt:1"): A.bone_fracture_adapter(tmp_path)


def test_every_yaml_names_a_registered_adapter_with_valid_options():
    ydir = Path(__file__).resolve().parents[1] / "data_manifests"
    files = [f for f in sorted(ydir.glob("*.yaml")) if f.name != "phantom.yaml"]
    assert len(files) >= 11
    for f in files:
        spec = yaml.safe_load(f.read_text())
        for k in ("name", "citation", "licence", "anatomy", "tasks", "split_policy", "adapter"):
            assert k in spec, (f.name, k)
        fn = ADAPTERS[spec["adapter"]]
        inspect.signature(fn).bind("ROOT", **(spec.get("options") or {}))   # unknown option names fail here
        normalize_tasks(spec["tasks"], f.name)


def by_yaml(name, root):
    "The shipped YAML, pointed at the fake root: its default options must fit the official layout."
    return load_manifest(YAMLS / f"{name}.yaml", root=root)


# ---------------------------------------------------------------- JSRT + SCR
def gif(path: Path, mask: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def test_jsrt_scr(tmp_path):
    film = np.tile(np.linspace(0, 4095, A.JSRT_SIZE).astype(np.uint16), (A.JSRT_SIZE, 1))   # dark -> bright in raw values
    (tmp_path / "Nodule154images").mkdir(); (tmp_path / "NonNodule93images").mkdir()
    film.astype(">u2").tofile(tmp_path / "Nodule154images" / "JPCLN001.IMG")
    film.astype(">u2").tofile(tmp_path / "NonNodule93images" / "JPCNN001.IMG")
    (tmp_path / "NonNodule93images" / "JPCNN002.IMG").write_bytes(b"\x00" * 100)               # truncated download
    png(tmp_path / "converted" / "JPCLN002.png", 64, 64)                                      # a pre-converted film
    heart = np.zeros((16, 16), bool); heart[8:12, 6:11] = True
    lung = np.zeros((16, 16), bool); lung[2:12, 1:6] = True
    for fold, case in ((1, "JPCLN001"), (2, "JPCNN001"), (1, "JPCLN002"), (2, "JPCNN002")):
        for key, folder in A.SCR_CLASSES.items():
            gif(tmp_path / "scratch" / f"fold{fold}" / "masks" / folder / f"{case}.gif", heart if key == "heart" else lung)
    (tmp_path / "CLNDAT_EN.txt").write_text("JPCLN001.IMG\t3\t15\t53\tmale\t1634\t692\tmalignant\tl.upper lobe\tlung cancer\n"
                                            "JPCLN002.IMG\t5\t35\t61\tfemale\t1024\t1024\tbenign\tr.lower lobe\thamartoma\n")
    (tmp_path / "cnndat_en.txt").write_text("JPCNN001.IMG\t48\tfemale\tnon-nodule\n")     # letter case differs
    with pytest.warns(UserWarning) as rec:
        df = by_yaml("jsrt", tmp_path)
    msgs = " ".join(str(w.message) for w in rec)
    assert "could not be converted" in msgs and "JPCNN002" in msgs                      # reported, not silent
    rep = pd.read_csv(tmp_path / "png" / "conversion_report.csv")
    assert dict(zip(rep.source.str[-12:], rep.status)) == {"JPCLN001.IMG": "converted", "JPCNN001.IMG": "converted", "JPCNN002.IMG": "failed"}
    assert df.image_id.tolist() == ["JPCLN001", "JPCLN002", "JPCNN001"]
    assert validate_manifest(df) == []
    t = df.set_index("image_id")
    assert t.nodule.tolist() == [1.0, 1.0, 0.0] and t.loc["JPCNN001", "split"] == "test" and t.loc["JPCNN001", "fold"] == 2
    assert t.loc["JPCLN001", "age"] == 53 and t.loc["JPCNN001", "sex"] == "female" and t.loc["JPCLN001", "malignant"] == 1
    assert t.loc["JPCLN002", "path"] == "converted/JPCLN002.png"                        # an existing PNG wins over conversion
    img = np.asarray(Image.open(tmp_path / t.loc["JPCLN001", "path"]))
    assert img.shape == (2048, 2048) and img[0, 0] == 255 and img[0, -1] == 0           # 12-bit, inverted
    # the nodule box: 35 mm at 0.175 mm/pixel is 200 px wide in the 2048 grid, i.e. 6.25 px on the 64-px PNG
    b = json.loads(t.loc["JPCLN002", "boxes"])[0]
    assert b["label"] == "nodule" and b["x1"] - b["x0"] == pytest.approx(6.25) and b["x0"] == pytest.approx(32 - 3.125)
    s = XrayDataset(df[df.image_id == "JPCLN002"], payload=("mask",))[0]
    assert s["mask_classes"] == ["heart", "left_lung", "right_lung", "left_clavicle", "right_clavicle"]
    assert s["mask"].shape == (5, 64, 64) and s["mask"][0].sum() == heart.sum() * 16 and s["mask"][1].sum() == lung.sum() * 16
    # the second run finds the PNGs and converts nothing
    with pytest.warns(UserWarning, match="JPCNN002"):                                   # the broken file is tried (and reported) again
        bare = A.jsrt_adapter(tmp_path, scr=None, clinical=())
    assert len(bare) == 3 and bare.age.isna().all() and "masks" not in bare
    (tmp_path / "scratch" / "fold1" / "masks" / "heart" / "JPCLN002.gif").unlink()
    with pytest.raises(ManifestError, match=r"JPCLN002 lacks the mask\(s\) \['heart'\]"), pytest.warns(UserWarning):
        A.jsrt_adapter(tmp_path)


# ---------------------------------------------------------------- VinDr-RibCXR
def test_vindr_ribcxr(tmp_path):
    def rib(x0, y0, x1, y1): return [{"x": x0, "y": y0}, {"x": x1, "y": y0}, {"x": x1, "y": y1}, {"x": x0, "y": y1}]
    train = {"img": {"0": "/home/someone/data/train/img/VinDr_RibCXR_train_000.png", "1": "data\\train\\img\\VinDr_RibCXR_train_001.png"}}
    for k, name in enumerate(A.RIB_LABELS):
        train[name] = {"0": rib(1, 1 + k, 6, 2 + k) if k < 18 else "None", "1": rib(2, 2, 10, 4) if name == "R1" else "None"}
    (tmp_path / "data" / "train").mkdir(parents=True); (tmp_path / "data" / "val").mkdir(parents=True)
    (tmp_path / "data" / "train" / "train_mask.json").write_text(json.dumps(train))
    val = [{"img": "VinDr_RibCXR_val_000.png", **{n: (rib(0, 0, 3, 3) if n == "L10" else "None") for n in A.RIB_LABELS}}]   # records
    (tmp_path / "data" / "val" / "val_mask.json").write_text(json.dumps(val))
    for sp, n in (("train", 0), ("train", 1), ("val", 0)): png(tmp_path / "data" / sp / "img" / f"VinDr_RibCXR_{sp}_00{n}.png", 24, 16)
    df = by_yaml("vindr_ribcxr", tmp_path)
    assert validate_manifest(df) == [] and df.n_ribs.tolist() == [18, 1, 1]
    assert df.set_index("image_id").loc["VinDr_RibCXR_val_000", "split"] == "test"
    ds = XrayDataset(df, payload=("mask", "boxes"))
    s = ds[0]
    assert s["mask_classes"] == A.RIB_LABELS and s["mask"].shape == (20, 24, 16)
    assert s["mask"][0].sum() == 6 * 2 and s["mask"][18:].sum() == 0                     # R1: x 1..6, y 1..2; L9, L10 not visible
    assert s["box_labels"][:2] == ["R1", "R2"] and s["boxes"][1].tolist() == [1, 2, 6, 3]
    assert ds[2]["mask"][19].sum() == 16 and ds[2]["mask"][:19].sum() == 0
    train["R3"]["1"] = [{"x": 1}, {"x": 2}]
    (tmp_path / "data" / "train" / "train_mask.json").write_text(json.dumps(train))
    with pytest.raises(ManifestError, match=r"row 1 \(VinDr_RibCXR_train_001.png\), rib R3"):
        A.vindr_ribcxr_adapter(tmp_path)


# ---------------------------------------------------------------- PAX-Ray++
def test_paxray_pp(tmp_path):
    H, W = 12, 10
    lung = np.zeros((H, W), np.uint8); lung[2:10, 1:5] = 1
    rib = np.zeros((H, W), np.uint8); rib[4:6, 0:8] = 1                                 # overlaps the lung
    comp = coco_mask.encode(np.asfortranarray(lung)); comp = {"size": [H, W], "counts": comp["counts"].decode()}
    flat = np.concatenate([[0], rib.T.reshape(-1), [0]]); runs = np.flatnonzero(np.diff(flat)) # column-major runs, zeros first
    unc = {"size": [H, W], "counts": np.diff(np.concatenate([[0], runs, [H * W]])).tolist()}
    cats = [{"id": 1, "name": "lung left"}, {"id": 2, "name": "rib 4 left"}, {"id": 3, "name": "heart"}]
    tv = {"images": [{"id": 1, "file_name": "RibFrac_001_frontal.png", "height": H, "width": W},
                     {"id": 2, "file_name": "RibFrac_001_lateral.png", "height": H, "width": W},
                     {"id": 3, "file_name": "RibFrac_002_frontal.png", "height": H, "width": W}],
          "categories": cats,
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": comp},
                          {"id": 2, "image_id": 1, "category_id": 2, "segmentation": unc, "iscrowd": 1},
                          {"id": 3, "image_id": 2, "category_id": 3, "segmentation": [[1.5, 1.5, 4.5, 1.5, 4.5, 3.5, 1.5, 3.5]]},
                          {"id": 4, "image_id": 2, "category_id": 3, "segmentation": [[6.5, 6.5, 8.5, 6.5, 8.5, 8.5]]}]}
    te = {"images": [{"id": 1, "file_name": "images_patlas/Lidc_007_frontal.png", "height": H, "width": W}], "categories": cats, "annotations": []}
    (tmp_path / "paxray_train_val.json").write_text(json.dumps(tv)); (tmp_path / "paxray_test.json").write_text(json.dumps(te))
    for n in ("RibFrac_001_frontal", "RibFrac_001_lateral", "RibFrac_002_frontal", "Lidc_007_frontal"): png(tmp_path / "images_patlas" / f"{n}.png", H, W)
    df = by_yaml("paxray_pp", tmp_path)
    assert validate_manifest(df) == [] and len(df) == 4
    assert df.view.tolist() == ["frontal", "lateral", "frontal", "frontal"]
    assert df.patient_id.tolist()[:2] == ["RibFrac_001", "RibFrac_001"] and df.path[3] == "images_patlas/Lidc_007_frontal.png"
    assert check_leakage(df).empty and df.split[3] == "test"                            # both views of a CT on one side
    ds = XrayDataset(df, payload=("mask",))
    s = ds[0]
    assert s["mask_classes"] == ["lung_left", "rib_4_left", "heart"]
    assert torch.equal(s["mask"][0], torch.from_numpy(lung)) and torch.equal(s["mask"][1], torch.from_numpy(rib))
    assert (s["mask"][0] & s["mask"][1]).sum() == 8 and s["mask"][2].sum() == 0         # overlapping classes keep their own channel
    assert ds[1]["mask"][2].sum() > 6 and ds[1]["mask"][:2].sum() == 0                  # two polygons of one class, OR-ed
    assert s["targets"].tolist() == [0] and ds[1]["targets"].tolist() == [1]            # view -> class index
    few = A.paxray_pp_adapter(tmp_path, classes=["heart"])
    assert list(json.loads(few.masks[1])) == ["heart"] and few.n_classes.tolist() == [0, 1, 0, 0]
    with pytest.raises(ManifestError, match="unknown class"): A.paxray_pp_adapter(tmp_path, classes=["spleen"])
    tv["annotations"].append({"id": 9, "image_id": 7, "category_id": 1, "segmentation": []})
    (tmp_path / "paxray_train_val.json").write_text(json.dumps(tv))
    with pytest.raises(ManifestError, match="annotation 9 refers to unknown image 7"): A.paxray_pp_adapter(tmp_path)


# ---------------------------------------------------------------- MIMIC-CXR-JPG
def gz_csv(path: Path, df: pd.DataFrame):
    with gzip.open(path, "wt") as f: df.to_csv(f, index=False)


def test_mimic_cxr(tmp_path):
    meta = pd.DataFrame({"dicom_id": ["d1", "d2", "d3", "d4", "d5"], "subject_id": ["10000032", "10000032", "10000032", "11000011", "12000022"],
                         "study_id": ["50000001", "50000001", "50000002", "50000003", "50000004"],
                         "ViewPosition": ["PA", "LATERAL", "AP", "PA", "AP"], "Rows": 8, "Columns": 8})
    gz_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", meta)
    lab = pd.DataFrame({"subject_id": ["10000032", "10000032", "11000011"], "study_id": ["50000001", "50000002", "50000003"],
                        "Atelectasis": [-1, None, 1], "Cardiomegaly": [-1, 1, 0], "Consolidation": [None, 0, 0],
                        "Edema": [0, 1, -1], "Pleural Effusion": [1, None, -1], "No Finding": [None, None, None]})
    gz_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz", lab)
    gz_csv(tmp_path / "mimic-cxr-2.0.0-split.csv.gz", pd.DataFrame({"dicom_id": ["d1", "d2", "d3", "d4", "d5"], "study_id": 0, "subject_id": 0,
                                                                    "split": ["train", "train", "train", "validate", "test"]}))
    for r in meta.itertuples():
        png(tmp_path / "files" / f"p{r.subject_id[:2]}" / f"p{r.subject_id}" / f"s{r.study_id}" / f"{r.dicom_id}.jpg")
    df = by_yaml("mimic_cxr", tmp_path)
    assert validate_manifest(df) == []
    assert df.image_id.tolist() == ["d1", "d3", "d4", "d5"]                               # the lateral view is filtered out
    assert df.path[0] == "files/p10/p10000032/s50000001/d1.jpg" and df.split.tolist() == ["train", "train", "val", "test"]
    d1 = df.iloc[0]
    assert d1.atelectasis == 1 and d1.cardiomegaly == 0 and d1.consolidation == 0        # GLoRIA policy, blank -> 0
    assert df.iloc[3][["atelectasis", "edema", "pleural_effusion"]].isna().all()         # a study without labels stays unknown
    ign = A.mimic_cxr_adapter(tmp_path, policy="ignore", views=None)
    assert len(ign) == 5 and np.isnan(ign.atelectasis[0]) and ign.view[1] == "LATERAL"
    ds = XrayDataset(df)
    assert ds[1]["targets"].tolist() == [1] and ds[1]["labels"].tolist() == [0, 1, 0, 1, 0]
    (tmp_path / "rep" / "p10" / "p10000032").mkdir(parents=True)
    (tmp_path / "rep" / "p10" / "p10000032" / "s50000001.txt").write_text(
        "FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n\n FINDINGS: Small left effusion.\n The heart is normal.\n\n IMPRESSION: Effusion.\n")
    r = A.mimic_cxr_adapter(tmp_path, reports="rep")
    assert r.findings[0] == "Small left effusion. The heart is normal." and r.impression[0] == "Effusion."
    assert r.report[0] == "Small left effusion. The heart is normal. Effusion." and pd.isna(r.report[2])
    gz_csv(tmp_path / "mimic-cxr-2.0.0-split.csv.gz", pd.DataFrame({"dicom_id": ["d1"], "split": ["train"]}))
    with pytest.raises(ManifestError, match="d3 is not in"): A.mimic_cxr_adapter(tmp_path)


# ---------------------------------------------------------------- PadChest
PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"


def test_padchest(tmp_path):
    t = pd.DataFrame({"ImageID": ["a1.png", "a2.png", "b1.png", "c1.png", "d1.png"], "ImageDir": ["0", "0", "12", "12", "3"],
                      "StudyDate_DICOM": ["20150304", "20150304", "20120101", "20170505", "20160101"], "StudyID": ["s1", "s1", "s2", "s3", "s4"],
                      "PatientID": ["p1", "p1", "p2", "p3", "p4"], "PatientBirth": ["1950.0", "1950.0", "1980", "", "1940"],
                      "PatientSex_DICOM": ["M", "M", "F", "F", "M"], "Projection": ["PA", "L", "AP_horizontal", "AP", "PA"],
                      "Labels": ["['pleural effusion', ' cardiomegaly']", "['pleural effusion']", "['normal']", None, "['COPD signs', 'pleural effusion']"]})
    t.to_csv(tmp_path / PADCHEST_CSV, index=False)
    for r in t.itertuples(): png(tmp_path / r.ImageDir / r.ImageID)
    df = by_yaml("padchest", tmp_path)
    assert validate_manifest(df) == []
    assert df.image_id.tolist() == ["a1", "b1", "c1", "d1"] and df.path[1] == "12/b1.png"     # the lateral image is filtered out
    assert df.pleural_effusion.tolist()[:2] == [1.0, 0.0] and df.cardiomegaly[0] == 1 and df.normal[1] == 1
    assert df.copd_signs[3] == 1 and np.isnan(df.pleural_effusion[2])                    # no label list -> unknown
    assert df.age.tolist()[:2] == [65, 32] and np.isnan(df.age[2])
    ds = XrayDataset(df)
    assert ds.target_columns == ["view", "sex"] and ds[1]["targets"].tolist() == [2, 1]
    allc = A.padchest_adapter(tmp_path, labels="all", projections=None)
    assert len(allc) == 5 and {"pleural_effusion", "cardiomegaly", "normal", "copd_signs"} <= set(allc.columns)
    t.loc[4, "Labels"] = "['normal'"
    t.to_csv(tmp_path / PADCHEST_CSV, index=False)
    with pytest.raises(ManifestError, match=r"row 3 \(ImageID d1.png\)"): A.padchest_adapter(tmp_path)


# ---------------------------------------------------------------- BRAX
def test_brax(tmp_path):
    paths = [f"images/id-{p}/Study_{s}/Series_1/image-{k}.png" for p, s, k in (("a", 1, 1), ("a", 1, 2), ("b", 7, 1))]
    t = pd.DataFrame({"DicomPath": [p.replace(".png", ".dcm") for p in paths], "PngPath": paths, "PatientID": ["a", "a", "b"],
                      "AccessionNumber": ["1", "1", "1"], "ViewPosition": ["PA", "L", "AP"], "PatientSex": ["F", "F", "M"],
                      "PatientAge": ["45", "45", "85 or more"], "Atelectasis": [-1, -1, 1], "Cardiomegaly": [-1, None, 0],
                      "Consolidation": [None, None, 1], "Edema": [0, 0, None], "Pleural Effusion": [-1, 0, 0], "No Finding": [None, None, None]})
    t.to_csv(tmp_path / "master_spreadsheet_update.csv", index=False)
    for p in paths: png(tmp_path / p)
    df = by_yaml("brax", tmp_path)
    assert validate_manifest(df) == [] and len(df) == 2
    assert df.study_id.tolist() == ["a/1", "b/1"]                                        # accession numbers repeat across patients
    assert df.atelectasis.tolist() == [1.0, 1.0] and df.cardiomegaly.tolist() == [0.0, 0.0] and df.pleural_effusion[0] == 1
    assert df.age.tolist() == [45, 85] and set(df.split) <= {"train", "val", "test"}
    assert XrayDataset(df)[1]["targets"].tolist() == [1, 0]                             # view AP, sex M
    assert len(A.brax_adapter(tmp_path, views=None, policy="zeros")) == 3
    with pytest.raises(ManifestError, match="Fracture"): A.brax_adapter(tmp_path, labels=["Fracture"])
