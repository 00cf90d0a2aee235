"""Every experiment notebook runs end to end through papermill (a real kernel, injected parameters), as a
batch user would run it, and leaves a results.json. CI sizes come from CI_PARAMS; defaults are already small."""
import json
from pathlib import Path

import pytest

from xr0_lib.experiments import list_experiments, run_experiment

# Smaller-than-default parameters for CI, per experiment (anything not named keeps its notebook default).
CI_PARAMS: dict[str, dict] = {
    "quickstart": {"preset": "ci"},   # ~160 images at 56 px, a 2-block ViT, 16 steps; still writes report.md
    "classification": {"seeds": [0, 1], "seed_mean": True, "convergence_seeds": [0, 1], "convergence_epochs": 8},   # seed-mean path
    "align": {"n_images": 64, "image_size": 56, "backbone": "xr0-vitp14", "epochs": 2, "batch_size": 16, "text_hidden": 32,
              "n_boot": 50},
    "segmentation": {"n_images": 160, "image_size": 56, "input_size": 56, "max_iters": 10, "tasks": ["bones"], "n_resamples": 20},
    "localisation": {"n_images": 40, "image_size": 56, "input_size": 56, "n_boot": 20,
                     "decoder": {"query_mode": "patch", "box_size": 0.1, "layers": 1, "width": 16, "heads": 2, "epochs": 2}},
    "report_generation": {"n_images": 120, "image_size": 56, "epochs": 2, "lm_epochs": 2, "n_resamples": 50, "fractions": [0.5, 1.0],
                          "max_new_tokens": 40},
    "grounding": {"n_images": 60, "image_size": 56, "input_size": 56, "epochs": 2, "layers": 1, "width": 32, "text_hidden": 32,
                  "n_boot": 20, "n_figure": 2, "torch_threads": 1},
    "ptx": {"n_images": 300, "image_size": 56, "input_size": 56, "backbones": ["xr0-vitp14"], "max_epochs": 2, "n_resamples": 20},
    "matrix": {"suite": "phantom-ci", "tasks": ["retrieval"]},   # the whole phantom-ci suite runs in tests/test_matrix.py
}

EXPERIMENTS = list_experiments()


def check_explore(res: dict):
    "explore scores the marker in three maps, pairs each two, and says how far each model's blocks moved its patch tokens."
    assert set(res["marker"]) == {"pre-trained", "random init", "raw pixels"}, res["marker"]
    assert set(res["marker_paired"]) == {"pre-trained vs random init", "pre-trained vs raw pixels", "random init vs raw pixels"}
    for name in ("pre-trained", "random init"):
        assert 0 < res["marker"][name]["patch_embedding_cosine"] <= 1 + 1e-5, res["marker"][name]
    assert "patch_embedding_cosine" not in res["marker"]["raw pixels"]


# What some experiments' results.json must hold beyond the common keys.
CHECKS = {"explore": check_explore}


def test_experiments_exist():
    assert EXPERIMENTS, "no experiment notebooks found in nbs/experiments"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs(name, tmp_path):
    res = run_experiment(name, tmp_path / name, CI_PARAMS.get(name, {}), timeout=900)
    assert res["experiment"], res
    assert (tmp_path / name / "results.json").is_file()
    assert (tmp_path / name / f"{name}.ipynb").is_file()
    json.dumps(res)  # serialisable
    if name in CHECKS: CHECKS[name](json.loads((tmp_path / name / "results.json").read_text()))
