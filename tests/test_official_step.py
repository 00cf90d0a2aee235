"""The side-by-side benchmark against the official DINOv2 step: xr0's weights map onto the official names (the
prototype layer's weight norm included), the benchmark says `skipped: ...` when no official checkout is configured,
and, where one is (`[code] dinov2` in settings.ini or XR0_CODE_DINOV2), both steps give the same loss terms and
gradient norms at a tiny size."""
import os

import pytest
import torch
from torch import nn

from xr0_lib.core import get_settings
from xr0_lib.models.backbones import ModelConfig
from xr0_lib.models.heads import HeadsConfig
from xr0_lib.ssl.meta import SSLConfig, SSLMetaArch
from xr0_lib.train.trainer import benchmark_official_step, official_state_dict

torch.set_num_threads(1)


def _meta(separate=False):
    heads = HeadsConfig(dino_out_dim=32, dino_hidden_dim=16, dino_bottleneck_dim=8, ibot_separate_head=separate,
                        ibot_out_dim=24, ibot_hidden_dim=16, ibot_bottleneck_dim=8)
    return SSLMetaArch.from_config(ModelConfig(arch="xr0-vitp14", num_registers=2, heads=heads), SSLConfig(), img_size=28)


@pytest.mark.parametrize("separate", [False, True])
def test_every_tensor_maps_to_an_official_name(separate):
    meta = _meta(separate)
    sd = official_state_dict(meta)
    n = sum(1 for side in (meta.student, meta.teacher) for _ in side.state_dict())
    assert len(sd) == n                                       # one entry per tensor, none merged or lost
    assert not any("parametrizations" in k or "reg_token" in k for k in sd)
    heads = ["dino_head", "ibot_head"] if separate else ["dino_head"]
    for side in ("student", "teacher"):
        assert f"{side}.backbone.register_tokens" in sd and sd[f"{side}.backbone.mask_token"].shape == (1, 64)
        for h in heads:
            assert sd[f"{side}.{h}.last_layer.weight_g"].shape[1] == 1
            # the official head's (deprecated) weight_norm layer computes the same prototypes from g and v
            ll = nn.utils.weight_norm(nn.Linear(8, sd[f"{side}.{h}.last_layer.weight_v"].shape[0], bias=False))
            ll.load_state_dict({"weight_g": sd[f"{side}.{h}.last_layer.weight_g"], "weight_v": sd[f"{side}.{h}.last_layer.weight_v"]})
            x = torch.randn(5, 8)
            torch.testing.assert_close(ll(x), getattr(meta, side)[h].last_layer(x))


def test_without_a_checkout_the_benchmark_says_skipped(tmp_path, monkeypatch):
    ini = tmp_path / "settings.ini"; ini.write_text("[paths]\n")
    monkeypatch.setenv("XR0_SETTINGS", str(ini)); monkeypatch.delenv("XR0_CODE_DINOV2", raising=False)
    r = benchmark_official_step()
    assert r == {"status": r["status"]} and r["status"].startswith("skipped: no official DINOv2 checkout")
    monkeypatch.setenv("XR0_CODE_DINOV2", str(tmp_path))      # named, but no checkout there
    r = benchmark_official_step()
    assert r["status"].startswith("skipped:") and str(tmp_path) in r["status"] and "ssl_meta_arch.py" in r["status"]
    with pytest.raises(ValueError, match="no official counterpart"):
        benchmark_official_step(arch="xr0-vitp14")


def _checkout():
    p = get_settings().code.get("dinov2")
    return str(p) if p is not None and (p / "dinov2" / "train" / "ssl_meta_arch.py").is_file() else None


def test_the_official_step_matches_at_a_tiny_size():
    code = _checkout()
    if code is None: pytest.skip("no official DINOv2 checkout configured ([code] dinov2 or XR0_CODE_DINOV2)")
    pytest.importorskip("omegaconf"); pytest.importorskip("fvcore")
    r = benchmark_official_step(code=code, batch=2, global_size=28, local_size=14, n_local=2, out_dim=64, precisions=("fp32",), repeats=1)
    assert r["status"] == "ok", r
    assert r["loss_max_abs_diff_fp32"] < 1e-5 and r["grad_norm_max_rel_diff_fp32"] < 1e-4, r
    assert r["xr0_step_s_fp32"] > 0 and r["official_step_s_fp32"] > 0 and r["official_gflop_fp32"] > 0
