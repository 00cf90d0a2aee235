"""Evaluation code against independent references on random data (fuzzed shapes, chunk sizes, label kinds):
P@k vs torchmetrics RetrievalPrecision, kNN vs scikit-learn KNeighborsClassifier with DINO weights,
AUROC/AUPRC/MCC vs scikit-learn, bootstrap reproducibility and pairing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from sklearn.metrics import average_precision_score, matthews_corrcoef, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from torchmetrics.retrieval import RetrievalPrecision

from xr0_lib.eval.metrics import auprc, auroc, bootstrap_metric, mcc
from xr0_lib.eval.probes import knn_predict_proba
from xr0_lib.knn import cosine_topk, precision_at_k

FAST = settings(max_examples=15, deadline=None)


@FAST
@given(nq=st.integers(1, 40), nc=st.integers(101, 400), d=st.integers(2, 32), ncls=st.integers(2, 6),
       qchunk=st.integers(1, 50), cchunk=st.integers(7, 500), seed=st.integers(0, 10_000))
def test_precision_at_k_matches_torchmetrics(nq, nc, d, ncls, qchunk, cchunk, seed):
    r = np.random.default_rng(seed)
    q, c = r.normal(size=(nq, d)).astype(np.float32), r.normal(size=(nc, d)).astype(np.float32)
    ql, cl = r.integers(0, ncls, nq), r.integers(0, ncls, nc)
    got = precision_at_k(q, ql, c, cl, ks=(5, 10, 100), query_chunk=qchunk, cand_chunk=cchunk)
    # torchmetrics scores only positive-scored items as hits, so shift cosines (same ranking) above zero
    S = F.normalize(torch.tensor(q), dim=1) @ F.normalize(torch.tensor(c), dim=1).T + 2
    tgt = torch.tensor(ql)[:, None] == torch.tensor(cl)[None]
    ind = torch.arange(nq)[:, None].expand(-1, nc)
    for k in (5, 10, 100):
        ref = RetrievalPrecision(top_k=k)(S.flatten(), tgt.flatten(), indexes=ind.flatten()).item()
        assert got[k] == pytest.approx(ref, abs=1e-6)


@FAST
@given(n=st.integers(30, 200), d=st.integers(3, 16), cchunk=st.integers(5, 300), seed=st.integers(0, 10_000))
def test_self_exclusion_by_id_and_position(n, d, cchunk, seed):
    r = np.random.default_rng(seed); E = r.normal(size=(n, d)).astype(np.float32)
    ids = np.array([f"x{i}" for i in range(n)])
    _, i_pos = cosine_topk(E, E, 5, cand_chunk=cchunk)
    _, i_id = cosine_topk(E.copy(), E, 5, query_ids=ids, cand_ids=ids, cand_chunk=cchunk)
    assert torch.equal(i_pos, i_id)
    assert not (i_pos == torch.arange(n)[:, None]).any()



def test_multilabel_relevance_matches_torchmetrics():
    "Multi-label P@k: 'any shared positive' and 'identical label set' against torchmetrics on the same ranking."
    r = np.random.default_rng(1)
    E = r.normal(size=(300, 24)).astype(np.float32); ML = r.integers(0, 2, (300, 3))
    qe, ce, qm, cm = E[:60], E[60:], ML[:60], ML[60:]
    S = F.normalize(torch.tensor(qe), dim=1) @ F.normalize(torch.tensor(ce), dim=1).T + 2
    ind = torch.arange(60)[:, None].expand(-1, 240)
    for relevance, tgt in (("any", (qm[:, None, :] & cm[None]).any(-1)), ("exact", (qm[:, None, :] == cm[None]).all(-1))):
        got = precision_at_k(qe, qm, ce, cm, ks=(10,), relevance=relevance)[10]
        ref = RetrievalPrecision(top_k=10)(S.flatten(), torch.tensor(tgt).flatten(), indexes=ind.flatten()).item()
        assert got == pytest.approx(ref, abs=1e-6)


def test_same_set_retrieval_matches_torchmetrics_without_the_diagonal():
    r = np.random.default_rng(2)
    E = r.normal(size=(300, 24)).astype(np.float32); L = r.integers(0, 4, 300); E[np.arange(300), L] += 3.0
    S = F.normalize(torch.tensor(E), dim=1) @ F.normalize(torch.tensor(E), dim=1).T + 2
    off = ~torch.eye(300, dtype=bool); tgt = torch.tensor(L)[:, None] == torch.tensor(L)[None]
    ref = RetrievalPrecision(top_k=5)(S[off], tgt[off], indexes=torch.arange(300)[:, None].expand(-1, 300)[off]).item()
    assert precision_at_k(E, L, E, L, ks=(5,))[5] == pytest.approx(ref, abs=1e-6)


def test_bf16_candidates_find_the_same_nearest_neighbour_up_to_near_ties():
    g = torch.Generator().manual_seed(0)
    Q, C = torch.randn(37, 16, generator=g), torch.randn(503, 16, generator=g)
    ref = (F.normalize(Q, dim=1) @ F.normalize(C, dim=1).T).topk(7, dim=1).indices
    _, got = cosine_topk(Q, C, 7, dtype=torch.bfloat16)
    assert (got[:, 0] == ref[:, 0]).float().mean() > 0.9


@FAST
@given(n=st.integers(60, 300), d=st.integers(2, 20), ncls=st.integers(2, 5), k=st.integers(1, 25),
       T=st.sampled_from([0.03, 0.07, 0.5]), seed=st.integers(0, 10_000))
def test_knn_matches_sklearn_with_dino_weights(n, d, ncls, k, T, seed):
    r = np.random.default_rng(seed)
    X = r.normal(size=(n, d)); y = r.integers(0, ncls, n); y[:ncls] = np.arange(ncls)  # every class present
    ntr = n * 2 // 3
    if k > ntr: k = ntr
    ours = knn_predict_proba(X[:ntr], y[:ntr], X[ntr:], k=k, temperature=T, kind="multiclass", n_classes=ncls)
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                              weights=lambda dist: np.exp((1 - dist) / T)).fit(X[:ntr], y[:ntr])
    ref = np.zeros_like(ours); ref[:, sk.classes_] = sk.predict_proba(X[ntr:])
    # our similarities are float32 (cosine_topk); exp(s / T) at T = 0.03 turns their ~1e-7 rounding into ~5e-6
    np.testing.assert_allclose(ours, ref, atol=2e-5)


@FAST
@given(n=st.integers(20, 300), L=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_binary_and_multilabel_metrics_match_sklearn(n, L, seed):
    r = np.random.default_rng(seed)
    y = r.integers(0, 2, (n, L)); y[0] = 1; y[1] = 0  # every label has both classes
    s = r.random((n, L))
    assert auroc(y, s).value == pytest.approx(roc_auc_score(y, s, average="macro"), abs=1e-12)
    assert auprc(y, s).value == pytest.approx(average_precision_score(y, s, average="macro"), abs=1e-12)
    want = np.mean([matthews_corrcoef(y[:, j], s[:, j] >= 0.5) for j in range(L)])
    assert mcc(y, s).value == pytest.approx(want, abs=1e-12)
    assert auroc(y[:, 0], s[:, 0]).value == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]), abs=1e-12)


@FAST
@given(n=st.integers(20, 300), C=st.integers(3, 7), seed=st.integers(0, 10_000))
def test_multiclass_metrics_match_sklearn(n, C, seed):
    r = np.random.default_rng(seed)
    y = r.integers(0, C, n); y[:C] = np.arange(C)
    p = r.random((n, C)); p /= p.sum(1, keepdims=True)
    assert auroc(y, p).value == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    assert mcc(y, p).value == pytest.approx(matthews_corrcoef(y, p.argmax(1)), abs=1e-12)


def test_bootstrap_reproducible_and_paired():
    r = np.random.default_rng(0)
    y = r.integers(0, 2, 300); a = y * 0.3 + r.random(300); b = y * 0.1 + r.random(300)
    one = bootstrap_metric(y, {"a": a, "b": b}, "auroc", n_resamples=500, seed=11)
    two = bootstrap_metric(y, {"a": a, "b": b}, "auroc", n_resamples=500, seed=11)
    other = bootstrap_metric(y, {"a": a}, "auroc", n_resamples=500, seed=12)
    for col in ("value", "ci_low", "ci_high", "median"):
        np.testing.assert_array_equal(one[col].values, two[col].values)
    np.testing.assert_array_equal(one.replicates[0], two.replicates[0])
    assert not np.array_equal(one.replicates[0], other.replicates[0])
    # paired: model a scored alone with the same seed sees the same resamples as in the pair
    alone = bootstrap_metric(y, {"a": a}, "auroc", n_resamples=500, seed=11)
    np.testing.assert_array_equal(alone.replicates[0], one.replicates[0])
    assert one.ci_low[0] < one.value[0] < one.ci_high[0]
    assert one.value[0] > one.value[1]
