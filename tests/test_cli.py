"Every `xr0` subcommand resolves to a real function and answers --help; the console script runs."
import contextlib, io, subprocess, sys

import pytest

from xr0_lib.cli import COMMANDS, _resolve, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help(name):
    fn = _resolve(COMMANDS[name][0])
    assert callable(fn)
    if name == "test":
        return  # `xr0 test --help` would hand --help to pytest
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        fn(["--help"])
    assert e.value.code == 0
    assert "usage" in buf.getvalue().lower()


def test_console_script():
    r = subprocess.run([sys.executable, "-m", "xr0_lib.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "quickstart" in r.stdout


def test_unknown_command_names_it():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        main(["nope"])
    assert "nope" in err.getvalue()
