"A run killed (SIGKILL) after a checkpoint and restarted ends with bitwise the same weights as an uninterrupted run."
import os, signal, subprocess, sys, time
from pathlib import Path

import torch

from test_trainer import toy_manifest
from xr0_lib.core import save_config
from xr0_lib.ssl.meta import SSLMetaArch
from xr0_lib.train import (DistInfo, build_multicrop, list_checkpoints, load_checkpoint, make_optimizer, micro_config,
                           param_groups, pretrain)

ROOT = Path(__file__).resolve().parents[1]


def _final_state(cfg, run: Path) -> dict:
    meta = SSLMetaArch.from_config(cfg.model, cfg.ssl, build_multicrop(cfg.data).global_size)
    opt = make_optimizer(param_groups(dict(meta.student.items())))
    st = load_checkpoint(list_checkpoints(run / "checkpoints")[-1], meta, opt, DistInfo())
    sd = {f"model.{k}": v for k, v in meta.state_dict().items()}
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items(): sd[f"opt.{i}.{k}"] = v
    return st, sd


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    man = toy_manifest(tmp_path / "data")
    cfg = micro_config(str(man), max_steps=8, ckpt_every=2, deterministic=True, keep_last=2)
    cfg.model.drop_path_rate = 0.1            # model randomness must be reproduced too
    save_config(cfg, tmp_path / "c.yaml")
    env = {**os.environ, "XR0_PROGRESS": "0", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "xr0_lib.train", "--config", str(tmp_path / "c.yaml"), "--out", str(run)],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (run / "checkpoints" / "step_00000002").is_dir():
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        assert time.time() - t0 < 120, "no checkpoint after 120 s"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL); p.wait()
    done = list_checkpoints(run / "checkpoints")
    assert p.returncode == -signal.SIGKILL and int(done[-1].name[5:]) < 8, "the run finished before it was killed"

    res = pretrain(cfg, run)                        # restart in the same folder: resumes by itself
    assert res["resumed_from"] is not None and res["finished"]
    ref = pretrain(cfg, tmp_path / "straight")
    assert ref["resumed_from"] is None

    st_a, a = _final_state(cfg, run)
    st_b, b = _final_state(cfg, tmp_path / "straight")
    assert st_a["step"] == st_b["step"] == 8
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step_00000006", "step_00000008"]  # keep_last=2
    assert not list((run / "checkpoints").glob(".tmp-*"))     # no half-written folder left behind
    assert (run / "checkpoints" / "step_00000008" / "teacher_hf" / "config.json").is_file()
    assert a.keys() == b.keys() and len(a) > 20
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"
    # the metrics log holds every step once, with the same losses
    import pandas as pd
    ma, mb = pd.read_csv(run / "metrics.csv"), pd.read_csv(tmp_path / "straight" / "metrics.csv")
    assert ma["step"].tolist() == list(range(8))
    assert (ma["total"].to_numpy() == mb["total"].to_numpy()).all()


def _tb_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder)); acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_resume_and_rerun_keep_every_log_row(tmp_path):
    "The monitor row at a checkpoint's step belongs to that checkpoint: resuming from it, or re-running a finished job, keeps it."
    import pandas as pd
    man = toy_manifest(tmp_path / "data")
    def cfg_for(**kw):
        cfg = micro_config(str(man), max_steps=4, ckpt_every=2, eval_every=2, deterministic=True, **kw)
        cfg.data.eval_manifest, cfg.data.eval_label, cfg.train.eval_k = str(man), "anatomy", 2
        return cfg
    run, ref = tmp_path / "split", tmp_path / "straight"
    assert pretrain(cfg_for(stop_after=2), run)["step"] == 2     # an interrupted job: checkpoint 2, then stop
    res = pretrain(cfg_for(), run)
    assert res["resumed_from"].endswith("step_00000002") and res["finished"]
    pretrain(cfg_for(), ref)
    mon, mon_ref = pd.read_csv(run / "monitor.csv"), pd.read_csv(ref / "monitor.csv")
    assert mon["step"].tolist() == mon_ref["step"].tolist() == [0, 2, 4]
    assert (mon["p_at_2"] - mon_ref["p_at_2"]).abs().max() < 1e-6
    assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [0, 1, 2, 3]
    assert _tb_steps(run / "tb", "monitor/p_at_2") == [0, 2, 4]

    logs = {n: (run / n).read_text() for n in ("metrics.csv", "monitor.csv")}
    again = pretrain(cfg_for(), run)                               # finished: nothing to do, nothing to change
    assert again["resumed_from"].endswith("step_00000004") and again["step"] == 4
    assert {n: (run / n).read_text() for n in logs} == logs
    assert abs(again["monitor"]["p_at_2"] - mon["p_at_2"].iloc[-1]) < 1e-6
    assert _tb_steps(run / "tb", "monitor/p_at_2") == [0, 2, 4]
    assert _tb_steps(run / "tb", "train/total") == [0, 1, 2, 3]
