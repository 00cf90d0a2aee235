"Integration and fuzz tests of xr0_lib.viz on the phantom set and random inputs."
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from xr0_lib.data.manifest import load_manifest
from xr0_lib.data.phantom import make_phantom_dataset, render_phantom
from xr0_lib.models.vit import create_backbone
from xr0_lib.viz.patches import pca_patch_map, cls_attention_maps, patch_similarity, attention_maps
from xr0_lib.viz.figures import upsample
from xr0_lib.viz.embedding_map import embed_2d, embedding_scatter
from xr0_lib.viz.widgets import VizSession, PatchMapViewer, CorrespondenceViewer, RetrievalViewer, EmbeddingExplorer


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    man = load_manifest(make_phantom_dataset(out, n=8, size=112, seed=0, workers=1, show_progress=False))
    return man


@pytest.fixture(scope="module")
def session(phantom):
    torch.manual_seed(0)
    return VizSession({"a": create_backbone("xr0-vitp14-reg4", img_size=112),
                       "b": create_backbone("xr0-vitp14", img_size=112)}, {"phantom": phantom})


def test_pca_foreground_covers_phantom_body(session, phantom):
    "On real phantoms, the PCA foreground of a random tiny ViT lies on the body and covers much of it."
    rows = list(range(len(phantom)))
    pm = pca_patch_map(session.patch_grids("a", "phantom", rows))
    body = np.stack([render_phantom(r, 112, 0)[1]["mask"] > 0 for r in rows])
    body_p = body.reshape(len(rows), 8, 14, 8, 14).mean((2, 4)) > 0.5
    precision = (pm.foreground & body_p).sum() / max(pm.foreground.sum(), 1)
    recall = (pm.foreground & body_p).sum() / body_p.sum()
    assert precision > 0.8 and recall > 0.5, (precision, recall)
    assert pm.rgb.min() >= 0 and pm.rgb.max() <= 1 and pm.rgb[~pm.foreground].max() == 0


def test_attention_rows_sum_to_one(session):
    bb = session.backbone("a")
    x = session.input("a", "phantom", 0)[None]
    a = bb.last_attention(x)
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    maps = attention_maps(bb, x, renormalize=True)
    np.testing.assert_allclose(maps.sum((-2, -1)), 1, atol=1e-5)


def test_viewers_on_phantoms(session, phantom):
    v = PatchMapViewer(session, ["a", "b"])
    assert v.error is None and set(v.result) == {"a", "b"}
    v.img.value = 5
    assert v.result["a"]["rows"][0] == 5 and v.error is None
    c = CorrespondenceViewer(session, "a")
    c.image_b.value = c.image_a.value
    assert c.result["best"] == c.result["point"]
    r = RetrievalViewer(session, "b", label="anatomy", k=3)
    want = [phantom.anatomy[i] == phantom.anatomy[r.query.value] for i in r.result["neighbours"]]
    assert r.result["correct"] == want
    e = EmbeddingExplorer(session, "a", color_by="anatomy")
    assert {t.name for t in e.fig.data} == set(phantom.anatomy.astype(str))
    e.select([0, 3]); assert len(e.selected_box.children) == 2


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), h=st.integers(2, 6), w=st.integers(2, 6), D=st.integers(1, 16), seed=st.integers(0, 10**6),
       thr=st.floats(0.0, 1.0))
def test_pca_patch_map_fuzz(B, h, w, D, seed, thr):
    "Any finite grid with at least 4 patches gives maps in [0,1] with a black background, never NaN."
    g = np.random.default_rng(seed).normal(size=(B, h, w, D)).astype(np.float32)
    pm = pca_patch_map(g, threshold=thr)
    assert pm.rgb.shape == (B, h, w, 3) and np.isfinite(pm.rgb).all()
    assert pm.rgb.min() >= 0 and pm.rgb.max() <= 1
    assert (pm.rgb[~pm.foreground] == 0).all()


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5), prefix=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_cls_attention_maps_fuzz(heads, h, w, prefix, seed):
    N = prefix + h * w
    a = torch.softmax(torch.from_numpy(np.random.default_rng(seed).normal(size=(heads, N, N)).astype(np.float32)), -1)
    m = cls_attention_maps(a, (h, w), prefix)
    assert m.shape == (heads + 1, h, w)
    np.testing.assert_allclose(m[:-1].sum((-2, -1)) + a[:, 0, :prefix].sum(-1).numpy(), 1, atol=1e-5)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        cls_attention_maps(a, (h, w), prefix + 1)


def test_patch_similarity_self_match():
    g = np.random.default_rng(0).normal(size=(5, 6, 8))
    for p in [(0, 0), (4, 5), (2, 3)]:
        sim, best = patch_similarity(g, p, g)
        assert best == p and abs(sim[p] - 1) < 1e-5


def test_embedding_map_umap_and_scatter_keeps_every_row():
    pytest.importorskip("umap")
    rng = np.random.default_rng(0)
    e = np.concatenate([rng.normal(0, 1, (30, 16)) + 4, rng.normal(0, 1, (30, 16)) - 4])
    m = embed_2d(e, method="umap", n_neighbors=10)
    assert m.method == "umap" and m.coords.shape == (60, 2) and np.isfinite(m.coords).all()
    tab = pd.DataFrame({"image_id": [f"i{i}" for i in range(60)], "group": ["a"] * 30 + [np.nan] * 30})
    fig = embedding_scatter(m.coords, tab, "group")
    assert sorted(int(c[0]) for t in fig.data for c in t.customdata) == list(range(60))
    assert {t.name for t in fig.data} == {"a", "unknown"}


def test_upsample_nearest_is_blocky():
    a = np.arange(4, dtype=np.float32).reshape(2, 2)
    np.testing.assert_array_equal(upsample(a, (4, 4)), np.kron(a, np.ones((2, 2))))
