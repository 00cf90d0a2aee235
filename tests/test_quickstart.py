"""The quickstart end to end at a tiny size: it writes report.md, its figures and results.json, and two runs with
the same seed give the same table (seeded pre-training, data order and probes). The second run reuses the first
run's rendered phantom folder, so the comparison isolates training and evaluation."""
import json
from pathlib import Path

import pandas as pd
import pytest

from xr0_lib.experiments import run_experiment
from xr0_lib.quickstart import cli_quickstart

TINY = {"preset": "ci", "n_images": 96, "max_steps": 6, "n_boot": 50}


def _run(out: Path, **extra) -> pd.DataFrame:
    res = run_experiment("quickstart", out, {**TINY, **extra}, timeout=600)
    assert res["experiment"] == "quickstart"
    for f in ("report.md", "training.png", "pca_patch_map.png", "gallery_pre_trained.png", "gallery_random_init.png",
              "quickstart_table.csv", "quickstart.ipynb"):
        assert (out / f).is_file(), f"{f} missing from {sorted(p.name for p in out.iterdir())}"
    report = (out / "report.md").read_text()
    assert "| task" in report and "pre-training wins" in report and "![training](training.png)" in report
    assert "None" not in report, [l for l in report.splitlines() if "None" in l]     # every caption value is filled in
    return pd.read_csv(out / "quickstart_table.csv")


def test_quickstart_twice_same_table(tmp_path):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", data_dir=str(tmp_path / "a" / "phantom"))
    assert set(a.task) >= {"anatomy", "view", "marker", "fracture"}
    assert {"retrieval P@5", "MLP probe AUROC", "patch probe AUROC"} <= set(a.evaluation)
    pd.testing.assert_frame_equal(a, b)
    ra = json.loads((tmp_path / "a" / "results.json").read_text())["metrics"]
    rb = json.loads((tmp_path / "b" / "results.json").read_text())["metrics"]
    assert ra == rb


def test_cli_quickstart_reports_a_failing_run(tmp_path, capsys):
    # an unknown notebook parameter stops the run before any work, with a clear message and exit code 1
    assert cli_quickstart(["--out", str(tmp_path), "-p", "n_imgs", "5"]) == 1
    assert "n_imgs" in capsys.readouterr().err
