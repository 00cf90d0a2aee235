"""Run every library notebook as nbdev-test does (cells tagged `slow` or `cuda` skipped), one test each.

Experiment notebooks (nbs/experiments/) are executed through papermill in tests/test_experiments.py.
"""
from pathlib import Path

import pytest
from nbdev.test import test_nb as run_notebook  # aliased: pytest would collect a name starting with test_

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))


def test_notebooks_found():
    assert any(p.name == "00_core.ipynb" for p in NBS), f"no library notebooks under {ROOT / 'nbs'}"


@pytest.mark.parametrize("nb", NBS, ids=[p.stem for p in NBS])
def test_notebook(nb):
    ok, secs = run_notebook(nb, skip_flags=["slow", "cuda"], basepath=ROOT, cell_timeout=600)
    assert ok, f"{nb.name} failed (traceback above, on stderr)"
