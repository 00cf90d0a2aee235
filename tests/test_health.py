"Pre-training health: a forced collapse is named by a warning with its step; diagnostics leave the trajectory alone; a run continues at a larger crop size."
import warnings

import pandas as pd
import pytest
import torch

from test_trainer import toy_manifest
from xr0_lib.train import load_train_config, micro_config, pretrain
from xr0_lib.models.backbones import load_backbone


def _run(tmp_path, name, overrides, **train):
    man = toy_manifest(tmp_path / "data")
    cfg = load_train_config(micro_config(str(man), **{"ckpt_every": 1000, "batch_size": 8, **train}), overrides)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = pretrain(cfg, tmp_path / name)
    return res, pd.read_csv(tmp_path / name / "metrics.csv"), [str(x.message) for x in w if "collapse warning" in str(x.message)]


def test_forced_collapse_is_warned_with_step_and_signal(tmp_path):
    "Centring off (EMA centre frozen at 0) and a near-zero teacher temperature send every image to one prototype."
    collapse = {"ssl": {"centering": "centering", "center_momentum": 1.0},
                "optim": {"warmup_teacher_temp": 1e-3, "teacher_temp": 1e-3}}
    _, m, msgs = _run(tmp_path, "collapse", collapse, max_steps=11, health_every=5)
    assert msgs, "no collapse warning"
    assert "at step 5" in msgs[0] and "teacher_marginal_entropy_dino -> 0" in msgs[0]
    h = m[m["rankme"].notna()]
    assert h["step"].tolist() == [0, 5, 10] and (h["collapse"].iloc[1:] >= 1).all()
    logged = pd.read_csv(tmp_path / "collapse" / "health_warnings.csv")
    assert 5 in logged["step"].tolist() and logged["signal"].str.contains("marginal_entropy").any()


def test_healthy_run_gives_no_warning(tmp_path):
    "Layer-scale 1, EMA centring, 64 prototypes: over its first steps no signal fires, and every diagnostic is finite."
    ok = {"model": {"layerscale_init": 1.0, "heads": {"dino_out_dim": 64}}, "ssl": {"centering": "centering"}}
    _, m, msgs = _run(tmp_path, "ok", ok, max_steps=6, health_every=3)
    assert msgs == []
    h = m[m["rankme"].notna()]
    assert h["step"].tolist() == [0, 3]
    cols = ["teacher_entropy_dino", "student_entropy_ibot", "kl_dino", "kl_ibot", "center_norm_dino", "rankme", "patch_cos",
            "update_ratio_b0", "last_layer_frozen"]
    assert h[cols].notna().all().all() and (h["collapse"] == 0).all()   # step 0: lr 0 (warm-up), no update yet
    assert h["update_ratio_b0"].iloc[-1] > 0 and h["update_ratio_b0"].iloc[0] == 0 and (h["teacher_entropy_dino"] <= h["log_k_dino"] + 1e-4).all()


def test_diagnostics_do_not_change_the_trajectory(tmp_path):
    "The same run with health every step and with it off ends with bitwise the same losses and teacher."
    man = toy_manifest(tmp_path / "data")
    res = {}
    for every in (1, 0):
        cfg = micro_config(str(man), max_steps=4, deterministic=True, health_every=every)
        cfg.model.drop_path_rate = 0.1
        res[every] = pretrain(cfg, tmp_path / f"h{every}")
    a, b = (pd.read_csv(tmp_path / f"h{e}" / "metrics.csv") for e in (1, 0))
    assert (a["total"].to_numpy() == b["total"].to_numpy()).all()
    assert a["rankme"].notna().all() and b["rankme"].isna().all()
    ta, tb = (load_backbone(res[e]["teacher_hf"]).state_dict() for e in (1, 0))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_continue_at_a_larger_global_crop(tmp_path):
    "A 28 px run continued at 56 px: the step goes on from the checkpoint, the position grid grows 2x2 -> 4x4, the loss stays finite."
    man = toy_manifest(tmp_path / "data", size=64)
    run = tmp_path / "run"
    cfg = micro_config(str(man), max_steps=4, ckpt_every=2)
    assert pretrain(cfg, run)["step"] == 4
    hi = load_train_config(cfg, {"data": {"global_size": 56, "local_size": 28}, "train": {"max_steps": 6}})
    with pytest.warns(UserWarning, match="position embeddings resampled from a 2x2 to a 4x4 grid"):
        res = pretrain(hi, run)
    assert res["resumed_from"].endswith("step_00000004") and res["step"] == 6 and res["finished"]
    m = pd.read_csv(run / "metrics.csv")
    assert m["step"].tolist() == list(range(6)) and m["total"].notna().all() and torch.isfinite(torch.tensor(m["total"].to_numpy())).all()
    assert m["lr"].iloc[4] > 0                                  # schedules continue (not a fresh warm-up from lr 0)
    bb = load_backbone(res["teacher_hf"])
    assert bb.pos_grid == (4, 4) and bb.pos_embed.shape[1] == 1 + 16
