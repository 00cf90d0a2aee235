"Every `xr0` subcommand resolves to a real function whose docstring is its help, answers --help; the console script runs."
import contextlib, io, subprocess, sys

import pytest

from xr0_lib.cli import COMMANDS, _resolve, command_help, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help(name):
    fn = _resolve(COMMANDS[name])
    assert callable(fn)
    assert command_help(COMMANDS[name]) == fn.__doc__.strip().splitlines()[0]   # read without importing = the real docstring
    if name == "test":
        return  # `xr0 test --help` would hand --help to pytest
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        fn(["--help"])
    assert e.value.code == 0
    assert "usage" in buf.getvalue().lower()


def test_console_script_lists_every_command_with_its_help():
    r = subprocess.run([sys.executable, "-m", "xr0_lib.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name, target in COMMANDS.items():
        assert name in r.stdout and command_help(target).split()[0] in r.stdout, name
    assert "args" not in r.stdout   # no undocumented positional


def test_unknown_command_names_it():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        main(["nope"])
    assert "nope" in err.getvalue()


def test_command_arguments_pass_through_untouched(capsys):
    assert main(["run", "no-such-experiment", "--out", "unused"]) == 1
    assert "no-such-experiment" in capsys.readouterr().err
