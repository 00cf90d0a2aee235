"""End-to-end evaluation on a few phantom images: `xr0 embed` (cache, reuse, bad-image report), and
`compare_backbones` on saved limited-data subsets (identical across backbones) with the patch and linear probes."""
import contextlib
import io

import numpy as np
import pandas as pd
import pytest
import torch

from xr0_lib.data.manifest import load_manifest, make_fraction_splits
from xr0_lib.data.phantom import make_phantom_dataset
from xr0_lib.eval.compare import compare_backbones, to_markdown, wide_table
from xr0_lib.eval.embeddings import cli_embed, extract_embeddings
from xr0_lib.models.backbones import load_backbone


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny convolutions on a shared 2-core box are faster single-threaded; restore afterwards."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    r1 = extract_embeddings(bb, df, ("cls",), img_size=56, cache_dir=tmp_path / "c2")
    f = next((tmp_path / "c2").iterdir()) / "cls.npy"
    t = f.stat().st_mtime_ns
    r2 = extract_embeddings(bb, df, ("cls",), img_size=56, cache_dir=tmp_path / "c2")
    assert f.stat().st_mtime_ns == t
    np.testing.assert_array_equal(r1["cls"], r2["cls"])
    # editing an image invalidates the key
    import shutil
    shutil.copy(df.abs_path.iloc[0], bad)
    r3 = extract_embeddings(bb, load_manifest(phantom), ("cls",), img_size=56, cache_dir=tmp_path / "c2")
    assert str(r3["cache_dir"]) != str(r1["cache_dir"]) and r3["valid"].all()


def test_compare_on_saved_fraction_splits(phantom, tmp_path):
    df = load_manifest(phantom)
    make_fraction_splits(df, fractions=(0.5, 1.0), seeds=(0, 1), stratify="anatomy", out=tmp_path / "fr")
    torch.manual_seed(0)
    bbs = {"a": load_backbone("xr0-vitp14", img_size=56, depth=4), "b": load_backbone("xr0-vitp14", img_size=56, depth=4)}
    tidy, wide = compare_backbones(
        bbs, df, ["anatomy"], fractions=(0.5, 1.0), seeds=(0, 1), probes=("patch", "linear"), metrics=("auroc", "mcc"),
        n_boot=30, img_size=56, cache_dir=tmp_path / "cache", fraction_dir=tmp_path / "fr",
        probe_kwargs={"patch": dict(max_epochs=3), "linear": dict(epochs=2, lrs=(1e-3, 1e-2))})
    assert len(tidy) == 2 * 2 * 2 * 2 * 2
    # every backbone trained on the same saved subset
    assert (tidy.groupby(["fraction", "seed", "probe"]).n_train.nunique() == 1).all()
    n_half = tidy.query("fraction == 0.5").n_train.iloc[0]
    assert 0 < n_half < tidy.query("fraction == 1.0").n_train.iloc[0]
    assert set(tidy.probe) == {"patch", "linear"}
    assert wide.shape == (2, 4) and list(wide.index) == ["a", "b"]
    assert wide_table(tidy, metric="auroc").shape == (2, 4)
    md = to_markdown(tidy)
    assert md.count("\n") == 3 and "anatomy MCC patch 0.5" in md
