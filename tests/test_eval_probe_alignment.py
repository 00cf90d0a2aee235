"""Probes score what they should: `compare_backbones` scores the MLP
probe on the right rows with the right class columns, matches an independent scikit-learn reference, and learns
from near-constant embeddings (a layer-scale-1e-5 ViT at init) instead of reporting its random initial projection."""
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from xr0_lib.eval.compare import compare_backbones, task_labels
from xr0_lib.eval.probes import fit_mlp_probe


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: one torch thread for tiny models


def _manifest_and_embeddings(n=420, d=24, seed=0):
    "Text classes whose sorted order differs from their order of appearance; a shuffled, repeating index; holes."
    r = np.random.default_rng(seed)
    names = np.array(["wrist", "chest", "knee"])
    cls = r.integers(0, 3, n)
    mu = r.normal(size=(3, d)) * 1.2
    z = (mu[cls] + r.normal(size=(n, d))).astype(np.float32)
    df = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                       "split": r.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2]), "anatomy": names[cls],
                       "marker": (z[:, 0] + 0.5 * r.normal(size=n) > 0).astype(float)})
    df.loc[r.choice(n, 15, replace=False), "anatomy"] = None          # unknown labels
    df.loc[r.choice(n, 15, replace=False), "marker"] = np.nan
    df.index = np.repeat(r.permutation(n // 2), 2)                     # index labels repeat and are shuffled
    valid = np.ones(n, bool); valid[r.choice(n, 10, replace=False)] = False   # rows a backbone failed to embed
    emb = {"near-constant": {"cls": (0.8 + 3e-5 * z).astype(np.float32), "valid": valid},   # layer scale 1e-5 at init
           "unit": {"cls": z, "valid": valid}}
    return df, emb


def _sklearn_reference(X, df, task, valid):
    "Logistic regression on standardised features, trained on the train rows, AUROC on the test rows."
    y, known, kind, _ = task_labels(df, task)
    split = df["split"].to_numpy(); use = known & valid
    tr, te = np.flatnonzero((split == "train") & use), np.flatnonzero((split == "test") & use)
    sc = StandardScaler().fit(X[tr])
    p = LogisticRegression(max_iter=2000).fit(sc.transform(X[tr]), y[tr]).predict_proba(sc.transform(X[te]))
    return roc_auc_score(y[te], p[:, 1] if kind == "binary" else p, multi_class="ovr"), len(tr), len(te)


@pytest.mark.parametrize("task", ["anatomy", "marker"])
def test_mlp_probe_matches_sklearn_on_the_same_rows(task):
    df, emb = _manifest_and_embeddings()
    tidy, _ = compare_backbones({k: "unused" for k in emb}, df, [task], fractions=(1.0,), seeds=(0,), probes=("mlp",),
                                metrics=("auroc",), n_boot=50, embeddings=emb,
                                probe_kwargs={"mlp": dict(max_epochs=40, lr=1e-3)}, show_progress=False)
    for name, e in emb.items():
        ref, ntr, nte = _sklearn_reference(e["cls"], df, task, e["valid"])
        r = tidy[tidy.backbone == name].iloc[0]
        assert (r.n_train, r.n_test) == (ntr, nte)
        assert ref > 0.8
        assert r.value > 0.8 and abs(r.value - ref) < 0.06, (name, r.value, ref)
        assert r.ci_low > 0.5


def test_probe_is_above_chance_on_its_training_rows_and_ignores_offset_and_scale():
    df, emb = _manifest_and_embeddings()
    y, known, _, _ = task_labels(df, "anatomy")
    split = df["split"].to_numpy()
    tr, va = np.flatnonzero((split == "train") & known), np.flatnonzero((split == "val") & known)
    fits = {k: fit_mlp_probe(e["cls"][tr], y[tr], e["cls"][va], y[va], max_epochs=40, lr=1e-3) for k, e in emb.items()}
    assert all(f.train_score > 0.9 for f in fits.values()), {k: f.train_score for k, f in fits.items()}
    pa = fits["unit"].predict_proba(emb["unit"]["cls"][va]); pb = fits["near-constant"].predict_proba(emb["near-constant"]["cls"][va])
    assert (pa.argmax(1) == pb.argmax(1)).mean() > 0.95
