"""Speed paths stay exact: the prefix-only last block, threaded decoding, the shared patch-grid extractor, the
group-max top-k and the bf16 shortlist re-ranked in fp32, and the one-call GPU benchmark at tiny size on CPU."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xr0_lib.data.manifest import load_manifest, read_image
from xr0_lib.augment import make_eval_transform
from xr0_lib.knn import _block_topk, cosine_topk
from xr0_lib.models.backbones import load_backbone, preprocess_config
from xr0_lib.eval.embeddings import _prefix_features, _prefix_only_ok, embed_batch, extract_embeddings, frozen_patch_grids
from xr0_lib.eval.segmentation import frozen_features
from xr0_lib.eval.det_train import detection_features
from xr0_lib.eval.detection import letterbox_image
from xr0_lib.eval.gpu_bench import benchmark_gpu

torch.set_num_threads(1)


def _scaled(bb):
    with torch.no_grad():
        for blk in bb.blocks: blk.ls1.gamma.uniform_(0.5, 1.5); blk.ls2.gamma.uniform_(0.5, 1.5)
    return bb.eval()


@pytest.mark.parametrize("registers", [0, 4])
def test_prefix_only_last_block_equals_full_forward(registers):
    torch.manual_seed(0)
    bb = _scaled(load_backbone("xr0-vitp14", img_size=56, depth=3, **({"num_registers": registers} if registers else {})))
    x = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        full = bb.forward_features(x); e = embed_batch(bb, x, ("cls", "registers"))
    assert _prefix_only_ok(bb)
    torch.testing.assert_close(e["cls"], full["cls"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e["registers"], full["registers"], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("img"); rng = np.random.default_rng(0)
    for i in range(7): Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 50), dtype=np.uint8)).save(d / f"{i}.png")
    (d / "3.png").write_bytes(b"broken")
    pd.DataFrame(dict(image_id=[f"i{i}" for i in range(7)], path=[f"{i}.png" for i in range(7)], patient_id=list("abcdefg"),
                      split="train")).to_csv(d / "m.csv", index=False)
    return load_manifest(d / "m.csv")


def test_threaded_decoding_matches_the_plain_loop_and_reports_bad_rows(files, tmp_path):
    bb = _scaled(load_backbone("xr0-vitp14", img_size=28, depth=2))
    outs = [extract_embeddings(bb, files, ("cls", "patch"), batch_size=3, cache_dir=tmp_path / f"c{t}", threads=t, show_progress=False)
            for t in (0, 1, 2)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o["cls"], outs[0]["cls"]); np.testing.assert_array_equal(o["patch"], outs[0]["patch"])
    assert outs[0]["valid"].tolist() == [True, True, True, False, True, True, True]
    assert np.isnan(outs[0]["patch"][3]).all() and not np.isnan(outs[0]["patch"][[0, 1, 2, 4, 5, 6]]).any()
    tf = make_eval_transform(preprocess_config(bb))
    with torch.no_grad(): ref = bb.forward_features(tf(read_image(files.abs_path.iloc[5]))[None])["cls"][0].numpy()
    np.testing.assert_allclose(outs[0]["cls"][5], ref, atol=1e-5)


def test_segmentation_and_detection_features_come_from_one_function(files):
    bb = load_backbone("xr0-vitp14", img_size=28, depth=3).eval()
    imgs = torch.rand(5, 1, 28, 28)
    seg = frozen_features(bb, imgs, [0, -1], batch_size=2)
    grids = frozen_patch_grids(bb, imgs, [0, -1], batch_size=3, normalise=True)
    for s, g in zip(seg, grids): torch.testing.assert_close(s, g.permute(0, 3, 1, 2))
    paths = files.abs_path.tolist()
    f, lbs, probs = detection_features(bb, paths, taps=(-2, -1), batch_size=2)
    pc = preprocess_config(bb)
    ok = [p for p, lb in zip(paths, lbs) if lb is not None]
    ref = frozen_patch_grids(bb, [letterbox_image(read_image(p), 28, pc["mean"], pc["std"]) for p in ok], (-2, -1), batch_size=4)
    torch.testing.assert_close(f, torch.stack(ref, 1))
    assert len(probs) == 1 and "row 3" in probs[0] and f.shape[0] == 6


def test_group_max_topk_equals_topk():
    g = torch.Generator().manual_seed(0)
    for cols in (5000, 5003, 70000):
        s = torch.randn(7, cols, generator=g); s[1, :200] = 5.0 + torch.rand(200, generator=g)
        v, i = _block_topk(s, 50)
        torch.testing.assert_close(v, s.topk(50, dim=1).values); torch.testing.assert_close(s.gather(1, i), v)


def test_bf16_shortlist_reranked_in_fp32_agrees_with_exact():
    g = torch.Generator().manual_seed(1)
    c = torch.randn(20000, 64, generator=g); q = c[:200] + 0.3 * torch.randn(200, 64, generator=g)
    ex_s, ex_i = cosine_topk(q, c, 10)
    lo_s, lo_i = cosine_topk(q, c, 10, dtype=torch.bfloat16, cand_chunk=4096)
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(lo_i, ex_i)])
    assert overlap >= 0.99, overlap
    torch.testing.assert_close(lo_s, ex_s, atol=1e-5, rtol=0)
    cn = F.normalize(c, dim=1)
    _, fi = cosine_topk(q, None, 10, exclude_self=False, cand_normalised=cn)   # pre-normalised fp32 candidates: same answer
    assert (fi == ex_i).float().mean() >= 0.999


def test_gpu_benchmark_runs_at_tiny_size_on_cpu():
    r = benchmark_gpu("tiny", device="cpu")
    assert r["scale"] == "tiny" and r["train_step"]["images_per_s"] > 0 and r["train_step"]["mfu"] > 0
    e = r["embedding"]   # auto precision: bf16 on a CPU that multiplies it natively, where no peer matches fp32 to 1e-3
    tol = 1e-3 if e["dtype"] == "fp32" else 1.5 * e["same_dtype_transformers_max_abs_diff_cls_fp32"] + 1e-3
    assert e["max_abs_diff_cls_fp32"] < tol, (e["dtype"], e["max_abs_diff_cls_fp32"], e["same_dtype_transformers_max_abs_diff_cls_fp32"])
    assert r["fsdp"]["backend"] == "gloo" and r["fsdp"]["world_size"] == 1
