"""The evaluation matrix end to end: the `phantom-ci` suite (every task, two backbones) through `xr0 run matrix`'s
notebook fills every table cell or says why it is missing; a restart recomputes nothing; a failing cell, a refused
parameter and an unconfigured data set are reported while the other cells run."""
import json, re, time
from pathlib import Path

import pandas as pd
import pytest

from xr0_lib.experiments import run_experiment
from xr0_lib.matrix import load_suite, matrix_results, matrix_tables, run_matrix

BACKBONES = ["xr0-vitp14", "xr0-vitp14-reg4"]
CELL = re.compile(r"^(\*\*)?-?\d+\.\d+(\*\*)?( \[-?\d+\.\d+, -?\d+\.\d+\])?$")   # value, optionally bold, optionally [CI]


def cell_ok(c: str) -> bool:
    return bool(CELL.match(c)) or c == "n/a (undefined)" or (c.startswith("missing: ") and len(c) > len("missing: ") + 3)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    t0 = time.time()
    res = run_experiment("matrix", out, {"suite": "phantom-ci", "backbones": BACKBONES}, timeout=3600)
    return out, res, time.time() - t0


def test_phantom_ci_every_task_every_cell(ci_run):
    out, res, seconds = ci_run
    status = pd.DataFrame(res["status"])
    suite = load_suite("phantom-ci")
    assert set(status.task) == set(suite["datasets"]["phantom"]["tasks"]), status
    # every cell ran, except experiments that do not exist in this checkout yet, which say so
    bad = status[~status.status.isin(["ok", "skipped (done)", "experiment not found"])]
    assert bad.empty, bad[["task", "status", "reason"]].to_string()
    for r in status[status.status == "experiment not found"].itertuples(): assert r.task in ("grounding", "report_generation"), r
    tables = {p.stem.removeprefix("matrix_"): p for p in out.glob("matrix_*.csv") if p.stem not in ("matrix_tidy", "matrix_scores", "matrix_status")}
    expected = {t["table"] for t in suite["datasets"]["phantom"]["tasks"].values()} | {"convergence", "paired"}
    assert expected <= set(tables), sorted(tables)
    for name, p in tables.items():
        if name == "paired": continue
        t = pd.read_csv(p, index_col=[0, 1, 2], keep_default_na=False)
        assert list(t.columns)[:2] == BACKBONES, (name, list(t.columns))   # + baselines an experiment adds (mean box)
        assert len(t), name
        wrong = [(i, b, t.loc[i, b]) for i in t.index for b in t.columns if not cell_ok(str(t.loc[i, b]))]
        assert not wrong, f"table {name}: cells neither filled nor explained: {wrong[:5]}"
    for ext in ("md", "tex"): assert (out / f"matrix_classification.{ext}").stat().st_size > 100
    assert "Table 1" in (out / "matrix.md").read_text() and "\\begin{tabular}" in (out / "matrix_retrieval.tex").read_text()
    assert (out / "matrix_heatmap.png").stat().st_size > 1000 and "plotly" in (out / "matrix_heatmap.html").read_text()
    # the embedding cache is one folder per data set, shared by the cells: one entry per backbone (and preprocessing)
    cache = out / "cache" / "phantom"
    assert (out / "cells/phantom/retrieval/single/cache").resolve() == cache.resolve()
    names = [p.name.rsplit("-", 1)[0] for p in cache.iterdir() if p.is_dir()]
    assert any("vitp14-reg4" in n for n in names) and any("vitp14" in n and "reg4" not in n for n in names), names
    # paired differences against the reference (the first backbone) from the experiments that compute them
    paired = pd.read_csv(out / "matrix_paired.csv")
    assert any("xr0-vitp14-reg4 − xr0-vitp14" in c for c in paired.columns), list(paired.columns)
    # convergence speed reaches the matrix through the classification records
    conv = [r for r in res["metrics"] if r["table"] == "convergence"]
    assert {r["metric"].split()[0] for r in conv} == {"epochs_to_95", "convergence_speedup"}, conv
    print(f"phantom-ci matrix: {seconds:.0f} s; by cell: {res['seconds_by_cell']}")


def test_restart_recomputes_nothing(ci_run):
    out, res, _ = ci_run
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("results.json")}
    t0 = time.time()
    status = run_matrix("phantom-ci", BACKBONES, out, reference=BACKBONES[0])
    ran = status[~status.status.isin(["skipped (done)", "experiment not found"])]
    assert ran.empty, ran[["task", "status"]].to_string()
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("results.json")} == before
    assert time.time() - t0 < 120, "a restart with every cell finished should only check the cells"
    assert len(matrix_results(out)) == len(pd.DataFrame(res["metrics"]))


def test_failures_are_reported_and_the_rest_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("XR0_DATASET_CHEXPERT", str(tmp_path / "no_chexpert_here"))
    suite = {"name": "broken", "datasets": {
        "ph": {"phantom": {"n_images": 24, "image_size": 56}, "params": {"image_size": 56, "n_boot": 10},
               "tasks": {"retrieval": {"tasks": ["no_such_column"]},                       # fails inside the notebook
                         "typo": {"experiment": "retrieval", "ks": "five"},                 # refused before it runs
                         "ok": {"experiment": "retrieval", "tasks": ["anatomy"], "ks": [5]}}},
        "chexpert": {"manifest": "data_manifests/chexpert.yaml", "tasks": {"retrieval": {}}}}}
    status = run_matrix(suite, ["xr0-vitp14"], tmp_path / "m").set_index(["dataset", "task"])
    assert status.loc[("ph", "retrieval"), "status"] == "failed" and "retrieval.ipynb" in status.loc[("ph", "retrieval"), "reason"]
    assert status.loc[("ph", "typo"), "status"] == "failed" and "'ks'" in status.loc[("ph", "typo"), "reason"]
    assert status.loc[("ph", "ok"), "status"] == "ok"
    assert status.loc[("chexpert", "retrieval"), "status"] == "data set not configured"
    assert "no_chexpert_here" in status.loc[("chexpert", "retrieval"), "reason"]
    t = matrix_tables(matrix_results(tmp_path / "m"))["retrieval"]
    assert t.loc[("chexpert", "retrieval", "—"), "xr0-vitp14"].startswith("missing: data set not configured")
    assert t.loc[("ph", "typo", "—"), "xr0-vitp14"].startswith("missing: failed")
    assert CELL.match(t.loc[("ph", "anatomy", "P@5"), "xr0-vitp14"])
