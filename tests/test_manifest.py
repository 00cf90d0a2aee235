"Manifest loading, validation, leakage, path safety and training-fraction subsets, end to end on tiny data."
import contextlib, io, json, os, tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings, strategies as st, HealthCheck
from PIL import Image

from xr0_lib.data.manifest import (ManifestError, load_manifest, safe_join, validate_manifest, check_leakage, cli_manifest,
                                   make_fraction_splits, load_fraction_split, assert_valid_manifest, fraction_subset)


def make_set(root: Path, n_pat=30, per=2, seed=0):
    rng = np.random.default_rng(seed); rows = []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for p in range(n_pat):
        split = ["train"] * 6 + ["val", "test"]
        split = split[p % 8]
        for k in range(per):
            rel = f"img/{p}_{k}.png"; Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / rel)
            rows.append({"image_id": f"{p}_{k}", "path": rel, "patient_id": f"P{p}", "split": split, "effusion": float(p % 3 == 0)})
    pd.DataFrame(rows).to_csv(root / "data.csv", index=False)
    (root / "set.yaml").write_text(yaml.safe_dump({"name": "tiny", "root": ".", "manifest": "data.csv",
                                                   "tasks": {"effusion": {"type": "binary"}}}))
    return root / "set.yaml"


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = cli_manifest(argv)
    return rc, out.getvalue(), err.getvalue()


def test_clean_set_passes_check(tmp_path):
    y = make_set(tmp_path)
    rc, out, _ = run_cli(["check", str(y)])
    assert rc == 0 and out.count("\n") == 1 and "60 images, 30 patients" in out


def test_planted_overlap_is_caught(tmp_path):
    y = make_set(tmp_path)
    t = pd.read_csv(tmp_path / "data.csv", dtype=str)
    t.loc[t.image_id == "7_1", "split"] = "train"       # patient P7 is a test patient; one image moves to train
    t.to_csv(tmp_path / "data.csv", index=False)
    lk = check_leakage(load_manifest(y))
    assert lk.patient_id.tolist() == ["P7"] and lk.splits[0] == "train,test"
    rc, out, err = run_cli(["check", str(y)])
    assert rc == 1 and "P7" in out and "1 patient_id overlap" in err


def test_dotdot_path_refused_with_clear_error(tmp_path):
    (tmp_path / "set").mkdir(); y = make_set(tmp_path / "set")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "secret.png")
    t = pd.read_csv(tmp_path / "set" / "data.csv", dtype=str); t.loc[5, "path"] = "img/../../secret.png"
    t.to_csv(tmp_path / "set" / "data.csv", index=False)
    with pytest.raises(ManifestError, match=r"row 5 \(image_id 2_1\), field 'path': path 'img/../../secret.png' escapes the data root"):
        load_manifest(y)
    rc, _, err = run_cli(["check", str(y)])
    assert rc == 2 and "escapes" in err


def test_symlink_escape_refused(tmp_path):
    (tmp_path / "set").mkdir(); y = make_set(tmp_path / "set"); (tmp_path / "elsewhere").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "elsewhere" / "x.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "set" / "img" / "ext")
    t = pd.read_csv(tmp_path / "set" / "data.csv", dtype=str); t.loc[0, "path"] = "img/ext/x.png"
    t.to_csv(tmp_path / "set" / "data.csv", index=False)
    with pytest.raises(ManifestError, match="symbolic link"): load_manifest(y)


def test_validation_lists_missing_files(tmp_path):
    y = make_set(tmp_path)
    for k in ("3_0", "11_1", "20_0"): (tmp_path / "img" / f"{k}.png").unlink()
    probs = validate_manifest(load_manifest(y))
    assert len(probs) == 3 and all("missing file" in p for p in probs)
    assert [p.split("image_id ")[1].split(")")[0] for p in probs] == ["3_0", "11_1", "20_0"]
    with pytest.raises(ManifestError, match="3 problem"): assert_valid_manifest(load_manifest(y))
    rc, out, _ = run_cli(["check", str(y)])
    assert rc == 1 and out.count("missing file") == 3
    rc, out, _ = run_cli(["check", str(y), "--no-files"])
    assert rc == 0


def test_fraction_splits_saved_and_shared(tmp_path):
    y = make_set(tmp_path, n_pat=200)
    rc, out, _ = run_cli(["fractions", str(y), "--out", str(tmp_path / "fr"), "--stratify", "effusion",
                          "--fractions", "0.05", "0.2", "1", "--seeds", "0", "1", "2"])
    assert rc == 0, out
    df = load_manifest(y); train = df[df.split == "train"]
    for s in range(3):
        small, mid, full = (load_fraction_split(tmp_path / "fr", f, s, df=df) for f in (0.05, 0.2, 1.0))
        assert set(small.image_id) < set(mid.image_id) < set(full.image_id) == set(train.image_id)
        assert small.groupby("patient_id").size().eq(2).all()
        assert small.effusion.sum() > 0                                       # stratification keeps positives in 5 %
    # a second run (e.g. for another backbone) produces byte-identical files
    make_fraction_splits(df, (0.05, 0.2, 1.0), range(3), stratify="effusion", out=tmp_path / "fr2")
    for f in sorted((tmp_path / "fr").glob("fraction-*.csv")):
        assert f.read_bytes() == (tmp_path / "fr2" / f.name).read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["..", ".", "a", "b", "img", "/", "x.png", "..."]), min_size=1, max_size=6))
def test_safe_join_never_escapes(tmp_path, parts):
    root = tmp_path / "r"; (root / "a").mkdir(parents=True, exist_ok=True)
    rel = "/".join(parts)
    try: p = safe_join(root, rel)
    except ManifestError: return
    assert p == root.resolve() or root.resolve() in p.parents


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 80), st.integers(1, 3), st.sampled_from([0.01, 0.05, 0.2, 0.5, 1.0]), st.integers(0, 9), st.integers(1, 4))
def test_fraction_subset_same_rows_saved_or_drawn(n_pat, per, fraction, seed, n_classes):
    "The (fraction, seed) subset is the same whether saved by make_fraction_splits first or drawn on the fly, and nested."
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"patient_id": np.repeat([f"P{p}" for p in range(n_pat)], per), "split": "train"})
    df["image_id"] = [f"i{k}" for k in range(len(df))]
    df["y"] = np.repeat(rng.integers(0, n_classes, n_pat), per).astype(float)
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)          # row order must not matter
    with tempfile.TemporaryDirectory() as d:
        make_fraction_splits(df, sorted({fraction, 0.5, 1.0}), [seed], stratify="y", out=d)
        saved = fraction_subset(df, fraction, seed, "y", fraction_dir=d)
    drawn = fraction_subset(df, fraction, seed, "y")
    assert np.array_equal(saved, drawn)
    assert set(drawn) <= set(fraction_subset(df, max(fraction, 0.5), seed, "y"))   # nested
    assert df.iloc[drawn].groupby("patient_id").size().eq(per).all()            # whole patients
    n = max(1, round(fraction * n_pat))
    assert df.iloc[drawn].patient_id.nunique() == n
    assert df.iloc[drawn].y.nunique() == min(n, df.y.nunique())                  # every class while there is room
