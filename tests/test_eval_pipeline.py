"""End-to-end evaluation on a few phantom images: `xr0 embed` (cache, reuse, bad-image report), `compare_backbones`
on saved limited-data subsets (identical across backbones) with the patch and linear probes, seed-mean rows, and the
paper tables rendered from tidy results (the quickstart's table, byte for byte)."""
import contextlib
import io
import re

import numpy as np
import pandas as pd
import pytest
import torch

from xr0_lib.data.manifest import load_manifest, make_fraction_splits
from xr0_lib.data.phantom import make_phantom_dataset
from xr0_lib.eval.compare import compare_backbones, headline
from xr0_lib.eval.tables import markdown_table, paired_verdict, paper_table
from xr0_lib.eval.embeddings import cli_embed, extract_embeddings
from xr0_lib.models.backbones import load_backbone


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: one torch thread for tiny models


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    d = tmp_path_factory.mktemp("ph")
    return make_phantom_dataset(d / "ph", n=40, size=64, seed=1, workers=1, show_progress=False)


def test_cli_embed_caches_and_reports(phantom, tmp_path):
    df = load_manifest(phantom)
    bad = df.abs_path.iloc[5]
    open(bad, "wb").write(b"\x89PNG truncated")
    out = tmp_path / "emb"
    args = ["--backbone", "xr0-vitp14", "--manifest", str(phantom), "--out", str(out), "--img-size", "56",
            "--tokens", "cls", "patch", "--patch-pool", "2", "--batch-size", "16"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert cli_embed(args) == 0
    assert "39/40 images embedded" in buf.getvalue()
    (folder,) = list(out.iterdir())
    rep = pd.read_csv(folder / "report.csv")
    assert rep.row.tolist() == [5] and rep.image_id[0] == df.image_id.iloc[5]
    assert np.load(folder / "patch_pool2.npy", mmap_mode="r").shape == (40, 2, 2, 64)
    # the same module twice → the second call is served from the cache (files untouched)
    bb = load_backbone("xr0-vitp14", img_size=56)
    r1 = extract_embeddings(bb, df, ("cls",), cache_dir=tmp_path / "c2")
    f = next((tmp_path / "c2").iterdir()) / "cls.npy"
    t = f.stat().st_mtime_ns
    r2 = extract_embeddings(bb, df, ("cls",), cache_dir=tmp_path / "c2")
    assert f.stat().st_mtime_ns == t
    np.testing.assert_array_equal(r1["cls"], r2["cls"])
    # editing an image invalidates the key
    import shutil
    shutil.copy(df.abs_path.iloc[0], bad)
    r3 = extract_embeddings(bb, load_manifest(phantom), ("cls",), cache_dir=tmp_path / "c2")
    assert str(r3["cache_dir"]) != str(r1["cache_dir"]) and r3["valid"].all()


def test_fast_path_agrees_with_the_plain_one_under_its_own_key(phantom, tmp_path):
    "fast=True (layer scale folded, compiled) gives the plain path's embeddings and caches them under another key."
    df = load_manifest(phantom).iloc[:6]
    bb = load_backbone("xr0-vitp14", img_size=56, depth=4)
    r1 = extract_embeddings(bb, df, ("cls",), cache_dir=tmp_path / "cache")
    r5 = extract_embeddings(bb, df, ("cls",), cache_dir=tmp_path / "cache", fast=True)
    assert str(r5["cache_dir"]) != str(r1["cache_dir"])
    np.testing.assert_allclose(r5["cls"][r5["valid"]], r1["cls"][r1["valid"]], atol=1e-4)


def test_compare_on_saved_fraction_splits(phantom, tmp_path):
    df = load_manifest(phantom)
    make_fraction_splits(df, fractions=(0.5, 1.0), seeds=(0, 1), stratify="anatomy", out=tmp_path / "fr")
    torch.manual_seed(0)
    bbs = {"a": load_backbone("xr0-vitp14", img_size=56, depth=4), "b": load_backbone("xr0-vitp14", img_size=56, depth=4)}
    tidy, wide = compare_backbones(
        bbs, df, ["anatomy"], fractions=(0.5, 1.0), seeds=(0, 1), probes=("patch", "linear"), metrics=("auroc", "mcc"),
        n_boot=30, cache_dir=tmp_path / "cache", fraction_dir=tmp_path / "fr",
        probe_kwargs={"patch": dict(max_epochs=3), "linear": dict(epochs=2, lrs=(1e-3, 1e-2))})
    assert len(tidy) == 2 * 2 * 2 * 2 * 2
    # every backbone trained on the same saved subset
    assert (tidy.groupby(["fraction", "seed", "probe"]).n_train.nunique() == 1).all()
    n_half = tidy.query("fraction == 0.5").n_train.iloc[0]
    assert 0 < n_half < tidy.query("fraction == 1.0").n_train.iloc[0]
    assert set(tidy.probe) == {"patch", "linear"}
    assert wide.shape == (2, 4) and list(wide.index) == ["a", "b"]
    assert paper_table(tidy[tidy.metric == "auroc"], rows="backbone", columns=("task", "metric", "probe", "fraction"), spread=None).shape == (2, 4)
    md = markdown_table(paper_table(headline(tidy), rows="backbone", columns=("task", "metric", "probe", "fraction"),
                                    spread="ci", scale=100, digits=1, best="backbone"))
    assert md.count("\n") == 3 and "anatomy mcc patch 0.5" in md and "**" in md


def test_seed_mean_rows_are_the_mean_of_the_seed_rows(phantom, tmp_path):
    "seed_mean=True: one row per backbone × metric whose value, spread and paired Δ are those of the per-seed rows."
    df = load_manifest(phantom)
    bbs = {"a": load_backbone("xr0-vitp14", img_size=56, depth=2), "b": load_backbone("xr0-vitp14", img_size=56, depth=2)}
    kw = dict(fractions=(0.5, 1.0), seeds=(0, 1), probes=("mlp", "knn"), n_boot=30, cache_dir=tmp_path / "cache",
              probe_kwargs={"mlp": dict(max_epochs=3, lr=1e-3), "knn": dict(k=5)}, reference="a")
    tref, _ = compare_backbones(bbs, df, ["anatomy"], **kw)
    tm, _ = compare_backbones(bbs, df, ["anatomy"], **kw, seed_mean=True)
    assert len(tm) == 2 * 2 * 2 * 4 and set(tm.seed) == {"mean"} and set(tm.n_seeds) == {2}
    keys = ["backbone", "probe", "fraction", "metric"]
    per = tref.groupby(keys, sort=False)
    mm = tm.merge(per.value.mean().reset_index(), on=keys, suffixes=("", "_per_seed")).dropna(subset=["value"])
    np.testing.assert_allclose(mm.value, mm.value_per_seed, atol=1e-9)
    ms = tm.merge(per.value.std().reset_index(), on=keys, suffixes=("", "_per_seed")).dropna(subset=["value_per_seed"])
    np.testing.assert_allclose(ms.seed_sd, ms.value_per_seed, atol=1e-9)
    dm = tm.query("backbone == 'b'").dropna(subset=["delta"])
    dp = tref.query("backbone == 'b'").groupby(keys[1:], sort=False).delta.mean().reset_index()
    dd = dm.merge(dp, on=keys[1:], suffixes=("", "_per_seed"))
    np.testing.assert_allclose(dd.delta, dd.delta_per_seed, atol=1e-9)     # Δ of the means = mean of the Δs
    assert ((dm.delta_ci_low <= dm.delta + 1e-9) & (dm.delta <= dm.delta_ci_high + 1e-9)).all()


# The quickstart report's table (preset ci, seed 0) before the table renderer moved to xr0_lib.eval.tables.
QUICKSTART_TABLE = """\
| task     | evaluation        | random init          | pre-trained          | Δ [paired 95% CI]       | pre-training wins       |
|:---------|:------------------|:---------------------|:---------------------|:------------------------|:------------------------|
| anatomy  | retrieval P@5     | 0.057 [0.014, 0.114] | 0.100 [0.029, 0.222] | +0.043 [-0.036, +0.165] | higher, not significant |
| view     | retrieval P@5     | 0.314 [0.200, 0.414] | 0.329 [0.207, 0.465] | +0.014 [-0.150, +0.229] | higher, not significant |
| anatomy  | MLP probe AUROC   | 0.472 [0.250, 0.619] | 0.503 [0.235, 0.655] | +0.031 [-0.153, +0.250] | higher, not significant |
| view     | MLP probe AUROC   | 0.479 [0.250, 0.750] | 0.521 [0.206, 0.817] | +0.042 [-0.133, +0.159] | higher, not significant |
| marker   | MLP probe AUROC   | 0.600 [0.233, 1.000] | 0.300 [0.000, 0.500] | -0.300 [-0.919, +0.000] | no                      |
| fracture | MLP probe AUROC   | 0.500 [0.000, 1.000] | 0.750 [0.500, 1.000] | +0.250 [-0.250, +0.931] | higher, not significant |
| marker   | patch probe AUROC | 0.700 [0.500, 1.000] | 0.600 [0.500, 0.919] | -0.100 [-0.326, +0.000] | no                      |"""


def _tidy_from_table(text: str) -> pd.DataFrame:
    "Tidy rows (value, CI, paired Δ) read back from the printed table."
    num = lambda c: [float(x) for x in re.findall(r"[-+]?\d+\.\d+", c)]
    recs = []
    for line in text.splitlines()[2:]:
        task, ev, base, model, delta, _ = [c.strip() for c in line.strip("|").split("|")]
        (b, bl, bh), (m, ml, mh), (d, dl, dh) = num(base), num(model), num(delta)
        recs += [dict(backbone="random init", task=task, evaluation=ev, value=b, ci_low=bl, ci_high=bh, delta=np.nan,
                      delta_ci_low=np.nan, delta_ci_high=np.nan),
                 dict(backbone="pre-trained", task=task, evaluation=ev, value=m, ci_low=ml, ci_high=mh, delta=d,
                      delta_ci_low=dl, delta_ci_high=dh)]
    return pd.DataFrame(recs)


def test_paper_table_reproduces_the_quickstart_table():
    tidy = _tidy_from_table(QUICKSTART_TABLE)
    table = paper_table(tidy, rows=("task", "evaluation"), columns="backbone", spread="ci", digits=3)
    table["pre-training wins"] = paired_verdict(tidy, "random init", "pre-trained")
    assert markdown_table(table) == QUICKSTART_TABLE
    assert table.reset_index().to_markdown(index=False) == QUICKSTART_TABLE


def test_probe_columns_cover_classes_a_small_subset_lacks():
    "A 1 % subset can miss a class that the test set has: the probabilities still have one column per class."
    from xr0_lib.eval.compare import _fit
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 10 + [3] * 5)
    emb = {"cls": rng.normal(size=(len(y), 8)).astype(np.float32)}
    tr, va, te = np.arange(0, 20), np.arange(20, 30), np.arange(25, 35)   # class 3 only in the test rows
    for probe, kw in (("knn", {"k": 5}), ("mlp", {"max_epochs": 2})):
        p = _fit(probe, emb, tr, va, te, y, "multiclass", 0, kw)
        assert p.shape == (len(te), 4), (probe, p.shape)
        assert np.allclose(p.sum(1), 1, atol=1e-5)
