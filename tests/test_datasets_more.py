"JSRT/SCR, VinDr-RibCXR, PAX-Ray++, MIMIC-CXR-JPG, PadChest and BRAX adapters on tiny fake replicas of their layouts."
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from xr0_lib.data.manifest import ManifestError, load_manifest, validate_manifest, check_leakage
from xr0_lib.data import datasets as D

YAMLS = Path(__file__).resolve().parents[1] / "data_manifests"


def png(path: Path, h=8, w=8, v=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), v, np.uint8)).save(path)


def by_yaml(name, root):
    "The shipped YAML, pointed at the fake root: its default options must fit the official layout."
    return load_manifest(YAMLS / f"{name}.yaml", root=root)


# ---------------------------------------------------------------- JSRT + SCR
def gif(path: Path, mask: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def test_jsrt_scr(tmp_path):
    film = np.tile(np.linspace(0, 4095, D.JSRT_SIZE).astype(np.uint16), (D.JSRT_SIZE, 1))   # dark -> bright in raw values
    (tmp_path / "Nodule154images").mkdir(); (tmp_path / "NonNodule93images").mkdir()
    film.astype(">u2").tofile(tmp_path / "Nodule154images" / "JPCLN001.IMG")
    film.astype(">u2").tofile(tmp_path / "NonNodule93images" / "JPCNN001.IMG")
    (tmp_path / "NonNodule93images" / "JPCNN002.IMG").write_bytes(b"\x00" * 100)               # truncated download
    png(tmp_path / "converted" / "JPCLN002.png", 64, 64)                                      # a pre-converted film
    heart = np.zeros((16, 16), bool); heart[8:12, 6:11] = True
    lung = np.zeros((16, 16), bool); lung[2:12, 1:6] = True
    for fold, case in ((1, "JPCLN001"), (2, "JPCNN001"), (1, "JPCLN002"), (2, "JPCNN002")):
        for key, folder in D.SCR_CLASSES.items():
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
    s = D.XrayDataset(df[df.image_id == "JPCLN002"], payload=("mask",))[0]
    assert s["mask_classes"] == ["heart", "left_lung", "right_lung", "left_clavicle", "right_clavicle"]
    assert s["mask"].shape == (5, 64, 64) and s["mask"][0].sum() == heart.sum() * 16 and s["mask"][1].sum() == lung.sum() * 16
    # the second run finds the PNGs and converts nothing
    with pytest.warns(UserWarning, match="JPCNN002"):                                   # the broken file is tried (and reported) again
        bare = D.jsrt_adapter(tmp_path, scr=None, clinical=())
    assert len(bare) == 3 and bare.age.isna().all() and "masks" not in bare
    (tmp_path / "scratch" / "fold1" / "masks" / "heart" / "JPCLN002.gif").unlink()
    with pytest.raises(ManifestError, match=r"JPCLN002 lacks the mask\(s\) \['heart'\]"), pytest.warns(UserWarning):
        D.jsrt_adapter(tmp_path)


# ---------------------------------------------------------------- VinDr-RibCXR
def test_vindr_ribcxr(tmp_path):
    def rib(x0, y0, x1, y1): return [{"x": x0, "y": y0}, {"x": x1, "y": y0}, {"x": x1, "y": y1}, {"x": x0, "y": y1}]
    train = {"img": {"0": "/home/someone/data/train/img/VinDr_RibCXR_train_000.png", "1": "data\\train\\img\\VinDr_RibCXR_train_001.png"}}
    for k, name in enumerate(D.RIB_LABELS):
        train[name] = {"0": rib(1, 1 + k, 6, 2 + k) if k < 18 else "None", "1": rib(2, 2, 10, 4) if name == "R1" else "None"}
    (tmp_path / "data" / "train").mkdir(parents=True); (tmp_path / "data" / "val").mkdir(parents=True)
    (tmp_path / "data" / "train" / "train_mask.json").write_text(json.dumps(train))
    val = [{"img": "VinDr_RibCXR_val_000.png", **{n: (rib(0, 0, 3, 3) if n == "L10" else "None") for n in D.RIB_LABELS}}]   # records
    (tmp_path / "data" / "val" / "val_mask.json").write_text(json.dumps(val))
    for sp, n in (("train", 0), ("train", 1), ("val", 0)): png(tmp_path / "data" / sp / "img" / f"VinDr_RibCXR_{sp}_00{n}.png", 24, 16)
    df = by_yaml("vindr_ribcxr", tmp_path)
    assert validate_manifest(df) == [] and df.n_ribs.tolist() == [18, 1, 1]
    assert df.set_index("image_id").loc["VinDr_RibCXR_val_000", "split"] == "test"
    ds = D.XrayDataset(df, payload=("mask", "boxes"))
    s = ds[0]
    assert s["mask_classes"] == D.RIB_LABELS and s["mask"].shape == (20, 24, 16)
    assert s["mask"][0].sum() == 6 * 2 and s["mask"][18:].sum() == 0                     # R1: x 1..6, y 1..2; L9, L10 not visible
    assert s["box_labels"][:2] == ["R1", "R2"] and s["boxes"][1].tolist() == [1, 2, 6, 3]
    assert ds[2]["mask"][19].sum() == 16 and ds[2]["mask"][:19].sum() == 0
    train["R3"]["1"] = [{"x": 1}, {"x": 2}]
    (tmp_path / "data" / "train" / "train_mask.json").write_text(json.dumps(train))
    with pytest.raises(ManifestError, match=r"row 1 \(VinDr_RibCXR_train_001.png\), rib R3"):
        D.vindr_ribcxr_adapter(tmp_path)


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
    ds = D.XrayDataset(df, payload=("mask",))
    s = ds[0]
    assert s["mask_classes"] == ["lung_left", "rib_4_left", "heart"]
    assert torch.equal(s["mask"][0], torch.from_numpy(lung)) and torch.equal(s["mask"][1], torch.from_numpy(rib))
    assert (s["mask"][0] & s["mask"][1]).sum() == 8 and s["mask"][2].sum() == 0         # overlapping classes keep their own channel
    assert ds[1]["mask"][2].sum() > 6 and ds[1]["mask"][:2].sum() == 0                  # two polygons of one class, OR-ed
    assert s["targets"].tolist() == [0] and ds[1]["targets"].tolist() == [1]            # view -> class index
    few = D.paxray_pp_adapter(tmp_path, classes=["heart"])
    assert list(json.loads(few.masks[1])) == ["heart"] and few.n_classes.tolist() == [0, 1, 0, 0]
    with pytest.raises(ManifestError, match="unknown class"): D.paxray_pp_adapter(tmp_path, classes=["spleen"])
    tv["annotations"].append({"id": 9, "image_id": 7, "category_id": 1, "segmentation": []})
    (tmp_path / "paxray_train_val.json").write_text(json.dumps(tv))
    with pytest.raises(ManifestError, match="annotation 9 refers to unknown image 7"): D.paxray_pp_adapter(tmp_path)


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
    ign = D.mimic_cxr_adapter(tmp_path, policy="ignore", views=None)
    assert len(ign) == 5 and np.isnan(ign.atelectasis[0]) and ign.view[1] == "LATERAL"
    ds = D.XrayDataset(df)
    assert ds[1]["targets"].tolist() == [1] and ds[1]["labels"].tolist() == [0, 1, 0, 1, 0]
    (tmp_path / "rep" / "p10" / "p10000032").mkdir(parents=True)
    (tmp_path / "rep" / "p10" / "p10000032" / "s50000001.txt").write_text(
        "FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n\n FINDINGS: Small left effusion.\n The heart is normal.\n\n IMPRESSION: Effusion.\n")
    r = D.mimic_cxr_adapter(tmp_path, reports="rep")
    assert r.findings[0] == "Small left effusion. The heart is normal." and r.impression[0] == "Effusion."
    assert r.report[0] == "Small left effusion. The heart is normal. Effusion." and pd.isna(r.report[2])
    gz_csv(tmp_path / "mimic-cxr-2.0.0-split.csv.gz", pd.DataFrame({"dicom_id": ["d1"], "split": ["train"]}))
    with pytest.raises(ManifestError, match="d3 is not in"): D.mimic_cxr_adapter(tmp_path)


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
    ds = D.XrayDataset(df)
    assert ds.target_columns == ["view", "sex"] and ds[1]["targets"].tolist() == [2, 1]
    allc = D.padchest_adapter(tmp_path, labels="all", projections=None)
    assert len(allc) == 5 and {"pleural_effusion", "cardiomegaly", "normal", "copd_signs"} <= set(allc.columns)
    t.loc[4, "Labels"] = "['normal'"
    t.to_csv(tmp_path / PADCHEST_CSV, index=False)
    with pytest.raises(ManifestError, match=r"row 3 \(ImageID d1.png\)"): D.padchest_adapter(tmp_path)


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
    assert D.XrayDataset(df)[1]["targets"].tolist() == [1, 0]                             # view AP, sex M
    assert len(D.brax_adapter(tmp_path, views=None, policy="zeros")) == 3
    with pytest.raises(ManifestError, match="Fracture"): D.brax_adapter(tmp_path, labels=["Fracture"])
