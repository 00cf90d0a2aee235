"""Every command block of README.md runs as written, so the README never shows a command that fails.

Each ```bash block is split into commands (a trailing backslash joins lines; `# ...` comments go). A command runs in a
fresh folder (with `nbs/` linked in, as from the repository root) at small sizes where a parameter allows it: RULES
names, per command, the tiny parameters appended or the sizes substituted, and otherwise the command runs exactly as
the README shows it. Commands that need what a test machine lacks (GPUs, several nodes, root and the network, or
minutes) are skipped with their reason, listed in SKIPS; `XR0_README_FULL=1` also runs the quickstart at `--preset ci`.
A ```yaml block holding a sweep (`experiment:`) is written to `grid.yaml` first, as the README tells the reader to.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FULL = os.environ.get("XR0_README_FULL") == "1"

# pattern (matched at the start of a command) -> why it is not run here
SKIPS = {
    r"pip install": "installs from the network; CI installs the package in a fresh virtual environment the same way",
    r"xr0 test\b": "the whole test suite, of which this file is part",
    r"xr0 quickstart\b": "minutes at its default size; tests/test_experiments.py runs the same notebook at --preset ci "
                         "(XR0_README_FULL=1 runs this command with --preset ci)",
    r"torchrun --nproc_per_node 8\b": "needs 8 GPUs (tests/test_distributed.py runs the same entry point on 2 CPU processes)",
    r"torchrun --nnodes": "needs two nodes",
    r"apt-get install": "needs root and the Debian mirrors; .ci/run installs Chromium",
    r"pytest tests/test_browser.py": "needs Chromium; .ci/run runs it",
    r"xr0 run explore\b": "needs a quickstart run's teacher (DIR); tests/test_experiments.py runs explore on its own tiny run",
}
if FULL: SKIPS.pop(r"xr0 quickstart\b")

# pattern -> (substitutions [(regex, replacement)], arguments appended): the small sizes a parameter allows
RULES = {
    r"xr0 quickstart\b": ([], ["--preset", "ci"]),
    r"xr0 run classification\b": ([], ["-p", "n_images", "120", "-p", "max_epochs", "2", "-p", "n_boot", "20"]),
    r"papermill nbs/experiments/retrieval.ipynb": ([], ["-p", "n_images", "32", "-p", "n_boot", "20"]),
    r"xr0 phantom\b": ([(r"--n \d+", "--n 60")], []),
    r"xr0 pretrain\b": ([(r"train\.max_steps=\d+", "train.max_steps=2")], ["--set", "train.batch_size=4"]),
    r"xr0 run matrix\b": ([], ["-p", "tasks", '["retrieval"]']),   # one cell; tests/test_matrix.py runs the whole phantom-ci suite
}


def readme_blocks(text: str) -> list[tuple[str, str]]:
    "(language, body) of every fenced block of the README."
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)


def block_commands(body: str) -> list[str]:
    "The commands of one bash block: continuation lines joined, comments dropped."
    cmds = []
    for line in body.replace("\\\n", " ").splitlines():
        toks = shlex.split(line, comments=True)
        if toks: cmds.append(shlex.join(toks))
    return cmds


def readme_commands(text: str) -> list[str]:
    "The commands of every bash block of `text`."
    return [c for lang, body in readme_blocks(text) if lang == "bash" for c in block_commands(body)]


def small(cmd: str) -> list[str]:
    "The argv to run for README command `cmd`: its rule's substitutions and appended small sizes, or `cmd` as written."
    for pat, (subs, extra) in RULES.items():
        if re.match(pat, cmd):
            for a, b in subs: cmd = re.sub(a, b, cmd)
            return shlex.split(cmd) + extra
    return shlex.split(cmd)


def test_readme_parsing():
    cmds = readme_commands("```bash\nxr0 a --x 1   # note\nxr0 b \\\n    --y '[1, 2]'\n```\n```ini\nk = v\n```\n")
    assert cmds == ["xr0 a --x 1", "xr0 b --y '[1, 2]'"]
    assert small("xr0 pretrain --set train.max_steps=200") == ["xr0", "pretrain", "--set", "train.max_steps=2", "--set", "train.batch_size=4"]


BLOCKS = [b for lang, b in readme_blocks(README.read_text()) if lang == "bash"]


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path):
    "Every command of bash block i, in order in one folder, exits 0 (or is skipped with its reason)."
    (tmp_path / "nbs").symlink_to(ROOT / "nbs")
    for lang, body in readme_blocks(README.read_text()):
        if lang == "yaml" and re.search(r"^experiment:", body, re.M): (tmp_path / "grid.yaml").write_text(body)
    env = {**os.environ, "XR0_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ran, skipped = [], []
    for cmd in block_commands(BLOCKS[i]):
        why = next((r for p, r in SKIPS.items() if re.match(p, cmd)), None)
        if why: skipped.append(f"{cmd}: {why}"); continue
        argv = small(cmd)
        p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"README command failed ({shlex.join(argv)}), exit {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        ran.append(cmd)
    if not ran: pytest.skip(" | ".join(skipped))
    for s in skipped: print("skipped:", s)
