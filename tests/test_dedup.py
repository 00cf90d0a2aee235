"""Scale, memory and end-to-end tests for `xr0_lib.data.dedup`."""
import os, shutil, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from xr0_lib.data.dedup import cli_dedup, filter_manifest, find_near_duplicates, quality_flags
from xr0_lib.data.dicom import preprocess_folder, synthetic_dicom

os.environ.setdefault("XR0_PROGRESS", "0")


def _peak_rss_reset() -> bool:
    "Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."
    try: Path("/proc/self/clear_refs").write_text("5"); return True
    except OSError: return False


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024
    return float("nan")


def _planted(n: int, d: int, n_groups: int, per_group: int, seed: int = 0):
    "Random unit-ish vectors with `n_groups` planted groups of `per_group` near copies; returns (emb, true group of each row)."
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    truth = np.full(n, -1)
    rows = rng.choice(n, n_groups * per_group, replace=False).reshape(n_groups, per_group)
    for g, r in enumerate(rows):
        emb[r[1:]] = emb[r[0]] + 0.02 * rng.normal(size=(per_group - 1, d)).astype(np.float32)
        truth[r] = g
    return emb, truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    "Two labelings group the same rows together (labels themselves may differ; -1 = alone)."
    if not ((a < 0) == (b < 0)).all(): return False
    m = a >= 0
    pairs = set(zip(a[m].tolist(), b[m].tolist()))
    return len(pairs) == len(set(a[m].tolist())) == len(set(b[m].tolist()))


def test_20k_rows_bounded_memory():
    "20k rows: exact planted groups, and the peak memory stays far below one N×N similarity matrix (1.6 GB)."
    emb, truth = _planted(20_000, 16, n_groups=300, per_group=3)
    reset = _peak_rss_reset(); before = _peak_rss_mb()
    t = time.perf_counter()
    groups = find_near_duplicates(emb, threshold=0.99, chunk=2048)
    elapsed = time.perf_counter() - t
    assert _same_partition(groups, truth)
    if reset: assert _peak_rss_mb() - before < 300, f"peak grew by {_peak_rss_mb() - before:.0f} MB"
    assert elapsed < 60, elapsed


def test_many_copies_are_folded():
    "2000 copies of one image give 2M pairs; folding keeps one group without holding them all."
    rng = np.random.default_rng(1)
    emb = np.concatenate([np.tile(rng.normal(size=(1, 8)), (2000, 1)), rng.normal(size=(500, 8))]).astype(np.float32)
    groups = find_near_duplicates(emb, 0.999, chunk=512, max_pairs=10_000)
    assert (groups[:2000] == 0).all() and (groups[2000:] == -1).all()


@pytest.mark.parametrize("seed", range(3))
def test_filter_is_a_partition_and_order_free(seed):
    rng = np.random.default_rng(seed)
    emb, truth = _planted(400, 24, n_groups=30, per_group=int(rng.integers(2, 5)), seed=seed)
    emb[rng.choice(400, 3, replace=False)] = np.nan
    df = pd.DataFrame({"path": [f"{i:04d}.png" for i in rng.permutation(400)], "patient_id": np.arange(400) % 37})
    kept, rep = filter_manifest(df, emb, 0.99)
    assert sorted(kept.path.tolist() + rep.path.tolist()) == sorted(df.path), "every row is kept or reported"
    assert (rep.reason == "bad_embedding").sum() == 3
    dup = rep[rep.reason == "near_duplicate"]
    assert set(dup.kept_as) <= set(kept.path), "duplicates point at a kept image"
    for _, grp in dup.groupby("group"):   # the kept one is the smallest path of its group
        assert grp.kept_as.iloc[0] < grp.path.min()
    perm = rng.permutation(400)
    kept2, rep2 = filter_manifest(df.iloc[perm], emb[perm], 0.99)
    assert sorted(kept2.path) == sorted(kept.path)


def test_quality_flags_in_worker_processes(tmp_path):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:200, 0:160]
    good = (128 + 60 * np.sin(x / 20) * np.cos(y / 30)).astype(np.uint8)
    imgs = {"good.png": good, "blank.png": np.zeros((200, 160), np.uint8),
            "noise.png": rng.integers(0, 256, (200, 160)).astype(np.uint8), "strip.png": good[:30]}
    for n, a in imgs.items(): Image.fromarray(a).save(tmp_path / n)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    names = list(imgs) + ["broken.png"]
    q1 = quality_flags(names, root=tmp_path, workers=1)
    q2 = quality_flags(names, root=tmp_path, workers=2)
    pd.testing.assert_frame_equal(q1, q2)
    assert q1.reason.tolist()[:4] == ["", "blank", "noise", "extreme_aspect"]
    assert q1.unreadable.tolist() == [False] * 4 + [True]


def test_preprocess_then_dedup_end_to_end(tmp_path):
    "DICOM folder with copies -> preprocess -> thumbnail embeddings -> xr0 dedup removes the copies and a blank scan."
    rng = np.random.default_rng(4)
    src = tmp_path / "dicom"; src.mkdir()
    y, x = np.mgrid[0:96, 0:80]
    for i in range(8):
        a = 1500 + 900 * np.sin(x / (6 + 2 * i)) * np.cos(y / (9 + i)) + rng.normal(0, 20, (96, 80))
        synthetic_dicom(a.clip(0, 4095).astype(np.uint16), "MONOCHROME2", 12, window=(1500, 2400)).save_as(
            src / f"s{i}.dcm", enforce_file_format=True)
    for i in (2, 5): shutil.copy(src / f"s{i}.dcm", src / f"s{i}_copy.dcm")   # re-sent studies
    synthetic_dicom(np.full((96, 80), 800, np.uint16), "MONOCHROME2", 12).save_as(src / "blank.dcm", enforce_file_format=True)
    out = tmp_path / "png"
    index, quarantine = preprocess_folder(src, out, size=48, workers=2)
    assert len(index) == 11 and len(quarantine) == 0
    thumbs = np.stack([np.asarray(Image.open(out / p).resize((16, 16)), np.float32).ravel() for p in index.path])
    emb = thumbs - thumbs.mean(0)     # a stand-in embedding; the real one comes from a backbone
    np.save(tmp_path / "emb.npy", emb)
    assert cli_dedup(["--manifest", str(out / "index.csv"), "--embeddings", str(tmp_path / "emb.npy"),
                      "--out", str(tmp_path / "dedup"), "--threshold", "0.999"]) == 0
    rep = pd.read_csv(tmp_path / "dedup" / "dedup_report.csv")
    kept = pd.read_csv(tmp_path / "dedup" / "index.csv")
    assert sorted(rep.path) == ["blank.png", "s2_copy.png", "s5_copy.png"]
    assert rep.set_index("path").reason["blank.png"] == "blank"
    assert set(rep[rep.reason == "near_duplicate"].kept_as) == {"s2.png", "s5.png"}
    assert len(kept) == 8 and "blank.png" not in set(kept.path)
