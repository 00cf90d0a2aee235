"""A sweep over 2 backbones x 2 fractions x 2 seeds, killed midway and restarted, finishes without
recomputing finished points and yields one table."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import nbformat
import pandas as pd

CODE = """
import json, pathlib
from xr0_lib.experiments import write_results
with open(log, 'a') as f: f.write(json.dumps([backbone, fraction, seed]) + '\\n')
score = {'a': 0.6, 'b': 0.8}[backbone] + 0.1 * fraction + 0.01 * seed
write_results(out_dir, 'toy', {'backbone': backbone, 'fraction': fraction, 'seed': seed},
              [{'task': 'anatomy', 'metric': 'auroc', 'value': score}])
"""


def _toy_notebook(path: Path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("out_dir = 'x'\nbackbone = 'a'\nfraction = 1.0\nseed = 0\nlog = 'log.jsonl'",
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(CODE)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, path)


def test_sweep_kill_and_resume(tmp_path):
    nbp = tmp_path / "toy.ipynb"; _toy_notebook(nbp)
    log = tmp_path / "log.jsonl"
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"experiment: {nbp}\nparameters: {{log: {str(log)!r}}}\n"
                    "grid:\n  backbone: [a, b]\n  fraction: [0.1, 1.0]\n  seed: [0, 1]\n")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "xr0_lib.cli", "sweep", str(grid), "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list(out.glob("*/results.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/.params_hash")}
    assert 1 <= len(finished_before) < 8, f"kill came too late or too early: {len(finished_before)} points done"

    rc = subprocess.call(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert rc == 0
    # finished points were not recomputed: same files, and one execution each in the log
    for name, mtime in finished_before.items():
        assert (out / name / ".params_hash").stat().st_mtime_ns == mtime, f"{name} was recomputed"
    runs = [tuple(json.loads(l)) for l in log.read_text().splitlines()]
    done_keys = set()
    for name in finished_before:
        kv = dict(part.split("=") for part in name.split("__"))
        done_keys.add((kv["backbone"], float(kv["fraction"]), int(kv["seed"])))
    for k in done_keys:
        assert runs.count(k) == 1, f"{k} ran {runs.count(k)} times"
    assert len(set(runs)) == 8
    summary = pd.read_csv(out / "sweep_summary.csv")
    assert (summary.status == "skipped (done)").sum() == len(finished_before)
    assert (summary.status != "failed").all()
    tidy = pd.read_csv(out / "sweep_tidy.csv")
    assert len(tidy) == 8 and set(tidy.backbone) == {"a", "b"}
    assert "backbone" in (out / "sweep.md").read_text() or "a" in (out / "sweep.md").read_text()


def test_sweep_reports_failures_and_continues(tmp_path):
    nbp = tmp_path / "toy.ipynb"; _toy_notebook(nbp)
    grid = tmp_path / "grid.yaml"
    # backbone 'c' raises KeyError in the notebook; the 'a' point must still finish
    grid.write_text(f"experiment: {nbp}\nparameters: {{log: {str(tmp_path / 'l.jsonl')!r}}}\ngrid:\n  backbone: [c, a]\n")
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-m", "xr0_lib.cli", "sweep", str(grid), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "FAILED" in r.stderr and "KeyError" in r.stderr
    assert (out / "backbone=a" / "results.json").is_file()
    assert (out / "backbone=c" / "toy.ipynb").is_file()  # executed notebook keeps the error


def test_killed_run_leaves_no_kernel(tmp_path):
    "SIGKILL to `xr0 run` alone (not its process group): the notebook's kernel dies with it (PR_SET_PDEATHSIG)."
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("out_dir = 'x'\npid_file = 'p'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import os, time, pathlib\npathlib.Path(pid_file).write_text(str(os.getpid()))\ntime.sleep(120)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, tmp_path / "sleep.ipynb")
    pid_file = tmp_path / "kernel.pid"
    proc = subprocess.Popen([sys.executable, "-m", "xr0_lib.cli", "run", str(tmp_path / "sleep.ipynb"), "-p", "pid_file", str(pid_file),
                             "--out", str(tmp_path / "out"), "--quiet"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline: time.sleep(0.2)
    kernel = int(pid_file.read_text())
    os.kill(proc.pid, signal.SIGKILL); proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try: os.kill(kernel, 0)
        except ProcessLookupError: break
        try:   # a zombie (dead, not yet reaped by init) counts as gone
            if Path(f"/proc/{kernel}/stat").read_text().split(") ")[1].startswith("Z"): break
        except FileNotFoundError: break
        time.sleep(0.2)
    else:
        os.kill(kernel, signal.SIGKILL)
        raise AssertionError(f"kernel {kernel} outlived the killed xr0 run")
