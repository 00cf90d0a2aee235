"""`xr0 embed` under torchrun: two ranks each embed half of the rows and rank 0 merges the shards into the same cache
folder, with the same arrays, validity and failure report (global row numbers) as one process."""
import os, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from xr0_lib.models.backbones import export_hf, load_backbone

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_write_what_one_process_writes(tmp_path):
    rng = np.random.default_rng(0); d = tmp_path / "img"; d.mkdir()
    for i in range(7): Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(d / f"{i}.png")
    (d / "5.png").write_bytes(b"not a png")                       # a corrupt file in the second rank's half
    pd.DataFrame(dict(image_id=[f"i{i}" for i in range(7)], path=[f"img/{i}.png" for i in range(7)], patient_id="p",
                      split="test")).to_csv(tmp_path / "m.csv", index=False)
    torch.manual_seed(0); export_hf(load_backbone("xr0-vitp14", img_size=28, depth=2), tmp_path / "bb")   # the same weights on every rank
    args = ["embed", "--backbone", str(tmp_path / "bb"), "--manifest", str(tmp_path / "m.csv"), "--tokens", "cls", "patch",
            "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "XR0_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "xr0_lib.cli", *args, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "xr0_lib.cli",
                          *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("images embedded") == 1 and "6/7 images embedded" in two.stdout   # rank 0 speaks for the job
    (f1,), (f2,) = list((tmp_path / "one").iterdir()), list((tmp_path / "two").iterdir())
    assert f1.name == f2.name                                      # the same cache key
    assert sorted(p.name for p in f2.iterdir()) == sorted(p.name for p in f1.iterdir())   # shard folders merged away
    for t in ("cls", "patch"):
        np.testing.assert_allclose(np.load(f2 / f"{t}.npy").astype(np.float32), np.load(f1 / f"{t}.npy").astype(np.float32),
                                   atol=1e-5 if t == "cls" else 2e-3)
    np.testing.assert_array_equal(np.load(f2 / "valid.npy"), [True] * 5 + [False, True])
    rep = pd.read_csv(f2 / "report.csv")
    assert rep.row.tolist() == [5] and rep.image_id.tolist() == ["i5"]   # global row numbers
