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


def _kept(out: Path) -> dict:
    "Every embedding and kept-result file of a matrix run's shared cache, with its modification time."
    return {p.relative_to(out): p.stat().st_mtime_ns for p in (out / "cache").rglob("*") if p.suffix == ".npz" or p.name.endswith(".npy")}


def test_adding_a_backbone_trains_only_it_and_gives_the_joint_tables(tmp_path):
    """A finished [A, B] run plus backbone C: only C is embedded and only C's probes, box decoders, segmentation heads and grounding models are trained (the
    other files are not rewritten; one torn entry of A is found and redone), and every table, CI and paired difference
    equals that of one joint [A, B, C] run."""
    from xr0_lib.matrix import _CI_TASKS, paired_table
    tasks = {t: _CI_TASKS[t] for t in ("retrieval", "classification", "localisation", "grounding", "segmentation")}
    suite = {"name": "grow", "defaults": {"n_boot": 20},
             "datasets": {"phantom": {"phantom": {"n_images": 120, "image_size": 56, "seed": 0}, "params": {"image_size": 56}, "tasks": tasks}}}
    a_b, a_b_c = BACKBONES, BACKBONES + ["xr0-vitt14"]
    joint, grown = tmp_path / "joint", tmp_path / "grown"
    assert (run_matrix(suite, a_b_c, joint, reference=a_b[0]).status == "ok").all()
    assert (run_matrix(suite, a_b, grown, reference=a_b[0]).status == "ok").all()
    before = _kept(grown)
    kept = sorted(p for p in before if p.parts[3:4] == ("results",) and p.name.startswith("probe-mlp"))
    assert kept, sorted(before)[:5]
    torn = grown / kept[0]; torn.write_bytes(torn.read_bytes()[:-64]); before.pop(kept[0])   # a partial entry: found and redone
    status = run_matrix(suite, a_b_c, grown, reference=a_b[0])
    assert (status.status == "ok").all(), status
    after = _kept(grown)
    assert {p: after[p] for p in before} == before, "files of A and B were rewritten: their work was redone"
    assert kept[0] in after and "recomputing it" in (grown / "cells/phantom/classification/single/classification.ipynb").read_text()
    new = set(after) - set(before) - {kept[0]}
    # the new files: C's embeddings and probe scores in its own cache folder, its convergence curves, decoder and grounding runs
    assert new and all("xr0-vitt14_" in p.parts[2] or p.name.startswith(("curve-", "detr-xr0-vitt14-", "ground-xr0-vitt14-", "seg-xr0-vitt14-")) for p in new), sorted(new)
    assert sum(p.name.startswith("seg-") for p in new) == len(_CI_TASKS["segmentation"]["heads"]) * len(_CI_TASKS["segmentation"]["tasks"]), sorted(new)
    assert any(p.name.startswith("probe-") for p in new) and any(p.name.startswith("detr-") for p in new)
    assert sum(p.name.startswith("ground-") for p in new) == len(_CI_TASKS["grounding"].get("fractions", [0.1, 1.0])), sorted(new)
    conv = _CI_TASKS["classification"]["convergence_seeds"]
    assert sum(p.name.startswith("curve-") for p in new) == len(conv) * len(tasks["classification"]["tasks"])
    ta, tb = matrix_results(joint), matrix_results(grown)
    pd.testing.assert_frame_equal(ta, tb)
    for name, t in matrix_tables(ta).items(): pd.testing.assert_frame_equal(t, matrix_tables(tb)[name])
    p = paired_table(ta)
    assert any("xr0-vitt14 − xr0-vitp14" in c for c in p.columns), list(p.columns)
    pd.testing.assert_frame_equal(p, paired_table(tb))
