"Trainer integration tests on a micro model: non-finite losses are skipped, logged and abort; bad images are reported; presets ship in the package."
import math, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from xr0_lib.augment import toy_radiograph
from xr0_lib.ssl.meta import SSLMetaArch
from xr0_lib.train import NonFiniteLossError, cli_pretrain, micro_config, pretrain, read_metrics


def toy_manifest(folder: Path, n: int = 8, size: int = 48) -> Path:
    "n synthetic radiographs and a manifest CSV (anatomy alternates hand/chest)."
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(toy_radiograph(size, seed=i)).save(folder / f"im{i}.png")
        rows.append(dict(image_id=f"i{i}", path=f"im{i}.png", patient_id=f"p{i}", split="train",
                         anatomy="chest" if i % 2 else "hand"))
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def _nan_at(monkeypatch, bad_steps):
    orig = SSLMetaArch.forward
    def forward(self, batch, teacher_temp, iteration=0):
        loss, terms = orig(self, batch, teacher_temp, iteration)
        if iteration in bad_steps:
            loss = loss * float("nan")
            terms = {**terms, "total": terms["total"] * float("nan")}
        return loss, terms
    monkeypatch.setattr(SSLMetaArch, "forward", forward)


def test_nonfinite_step_is_skipped_and_logged(tmp_path, monkeypatch, capsys):
    man = toy_manifest(tmp_path / "data")
    _nan_at(monkeypatch, {1})
    res = pretrain(micro_config(str(man), max_steps=3, ckpt_every=10), tmp_path / "run")
    assert res["finished"] and res["step"] == 3
    m = read_metrics(res["metrics_csv"])
    assert m["nonfinite"].tolist() == [0, 1, 0]
    assert math.isnan(m["total"][1]) and np.isfinite(m["total"][[0, 2]]).all()
    assert "non-finite loss at step 1" in capsys.readouterr().err
    # the skipped step changed nothing: no NaN reached the weights
    from xr0_lib.models.backbones import load_backbone
    bb = load_backbone(res["teacher_hf"])
    assert all(torch.isfinite(p).all() for p in bb.parameters())


def test_nonfinite_in_a_row_aborts_with_terms(tmp_path, monkeypatch):
    man = toy_manifest(tmp_path / "data")
    _nan_at(monkeypatch, {1, 2, 3})
    with pytest.raises(NonFiniteLossError, match=r"step 2: .*dino_local=.*2 non-finite losses in a row"):
        pretrain(micro_config(str(man), max_steps=5, ckpt_every=10, max_nonfinite=2), tmp_path / "run")


def test_cli_runs_and_reports_bad_config(tmp_path, capsys):
    man = toy_manifest(tmp_path / "data", n=4)
    cfg = micro_config(str(man), max_steps=2)
    from xr0_lib.core import save_config
    save_config(cfg, tmp_path / "c.yaml")
    assert cli_pretrain(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--set", "train.ckpt_every=1"]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert cli_pretrain(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r2"), "--set", "train.batchsize=3"]) == 2
    assert "train.batchsize" in capsys.readouterr().err


def test_presets_ship_inside_the_package(tmp_path):
    "An installed xr0 run from any folder finds every pre-training preset (no configs/ folder is read)."
    code = ("from xr0_lib.train import TRAIN_PRESETS, load_train_config\n"
            "for n in TRAIN_PRESETS: load_train_config(n, {'train': {'max_steps': 3}})\n"
            "print(sorted(TRAIN_PRESETS))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'cpu-tiny', 'cxformer-s', 'rad-dino-continual', 'xr0-vitb14'" in r.stdout
