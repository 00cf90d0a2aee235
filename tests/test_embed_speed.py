"""The default CPU embedding path (oneDNN-packed GEMMs with GELU and residual adds fused, `FusedBackbone`) gives the
plain module's embeddings: every token type, with and without registers, in fp32 to rounding and in bf16 within
the distance autocast keeps; `xr0 embed` starts without the notebook machinery, and a Hugging Face folder loads without
importing transformers once the position-resize probe is cached."""
import os, subprocess, sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from xr0_lib.augment import make_eval_transform
from xr0_lib.data.manifest import read_image
from xr0_lib.eval.embeddings import _compute, embed_batch, extract_embeddings
from xr0_lib.models.backbones import load_backbone, preprocess_config
from xr0_lib.models.inference import FusedBackbone, fused_backbone

torch.set_num_threads(1)


def _scaled(bb):
    with torch.no_grad():
        for blk in bb.blocks: blk.ls1.gamma.uniform_(0.5, 1.5); blk.ls2.gamma.uniform_(0.5, 1.5)
    return bb.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("emb"); rng = np.random.default_rng(0)
    for i in range(5): Image.fromarray(rng.integers(0, 255, (70, 90), dtype=np.uint8)).save(d / f"{i}.png")
    df = pd.DataFrame(dict(image_id=[f"i{i}" for i in range(5)], path=[f"{i}.png" for i in range(5)], patient_id="p", split="test"))
    df["abs_path"] = [str(d / p) for p in df.path]
    return df


@pytest.mark.parametrize("registers", [0, 4])
def test_fused_copy_equals_the_module_for_every_token(registers):
    torch.manual_seed(0)
    bb = _scaled(load_backbone("xr0-vitp14", img_size=56, depth=3, **({"num_registers": registers} if registers else {})))
    fb = fused_backbone(bb, "fp32"); x = torch.randn(3, 3, 56, 56)
    assert isinstance(fb, FusedBackbone)
    tokens = ("cls", "registers", "patch", "patch_mean")
    with torch.no_grad(): ref, got, pre = embed_batch(bb, x, tokens), embed_batch(fb, x, tokens), embed_batch(fb, x, ("cls", "registers"))
    for t in tokens: torch.testing.assert_close(got[t].float(), ref[t].float(), atol=1e-3 if t == "patch" else 1e-5, rtol=1e-3)
    for t in ("cls", "registers"): torch.testing.assert_close(pre[t], ref[t], atol=1e-5, rtol=1e-5)


def test_extract_embeddings_uses_the_fused_copy_and_keeps_its_values(files, tmp_path, monkeypatch):
    torch.manual_seed(0)
    bb = _scaled(load_backbone("xr0-vitp14", img_size=56, depth=4, num_registers=2))
    seen = []
    orig = embed_batch.__globals__["embed_batch"]
    monkeypatch.setitem(_compute.__globals__, "embed_batch", lambda m, *a, **k: (seen.append(type(m).__name__), orig(m, *a, **k))[1])
    r = extract_embeddings(bb, files, tokens=("cls", "patch"), batch_size=2, cache_dir=tmp_path, show_progress=False)
    assert set(seen) == {"FusedBackbone"} and r["valid"].all()
    tf = make_eval_transform(preprocess_config(bb))
    x = torch.stack([tf(read_image(p)) for p in files.abs_path])
    with torch.no_grad(): ref = bb.forward_features(x)
    np.testing.assert_allclose(r["cls"], ref["cls"].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(r["patch"], np.float32), ref["patch"].numpy(), atol=2e-3)
    seen.clear()   # last4 keeps the plain module
    extract_embeddings(bb, files, tokens=("last4",), batch_size=2, cache_dir=tmp_path, show_progress=False)
    assert set(seen) == {"DinoVisionTransformer"}


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no native bf16 on this CPU")
def test_bf16_fused_copy_is_as_close_to_fp32_as_autocast():
    torch.manual_seed(0)
    bb = _scaled(load_backbone("xr0-vits14", img_size=112, depth=4)); x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        ref = bb.forward_features(x)["cls"]
        with torch.autocast("cpu", dtype=torch.bfloat16): ac = bb.forward_features(x)["cls"].float()
    got = fused_backbone(bb, "bf16").forward_prefix(x)["cls"]
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() <= 1.25 * (ac - ref).abs().max() + 1e-3


def test_embed_command_starts_without_nbformat():
    code = "import sys, xr0_lib.cli as c; c._resolve(c.COMMANDS['embed']); print('nbformat' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_second_hf_load_does_not_import_transformers(tmp_path):
    from xr0_lib.models.backbones import export_hf
    folder = tmp_path / "hf"; export_hf(load_backbone("xr0-vitp14", img_size=56, depth=1), folder)
    code = ("import sys; from xr0_lib.models.backbones import load_backbone; load_backbone(sys.argv[1]); "
            "print('transformers' in sys.modules)")
    env = {**os.environ, "XR0_CACHE_DIR": str(tmp_path / "cache")}
    run = lambda: subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert run() == "True"                       # the first load probes transformers and keeps the answer
    assert (tmp_path / "cache" / "hf_pos_interp.json").is_file()
    assert run() == "False"                      # later processes read it (a corrupt file: see nbs/22_models.interop)
