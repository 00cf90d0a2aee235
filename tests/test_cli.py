"Every `xr0` subcommand resolves to a real function whose docstring is its help, answers --help; the console script runs."
import contextlib, io, subprocess, sys, time

import nbformat

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


def _xr0(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "xr0_lib.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_run_refuses_a_mistyped_parameter_before_any_work(tmp_path):
    t = time.time()
    r = _xr0("run", "retrieval", "-p", "ks", "notalist", "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "'ks' expects list" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and time.time() - t < 30   # refused before the kernel starts


def test_sweep_reports_a_bad_grid_in_one_line(tmp_path, capsys):
    from xr0_lib.experiments import cli_sweep
    bodies = ("experiment: retrieval\ngrid: [1, 2]\n", "experiment: retrieval\ngrid: {ks: notalist}\n",
              "experiment: retrieval\ngrid: {ks: [notalist]}\n", "experiment: nosuch\ngrid: {seed: [0]}\n", "grid: [")
    for i, body in enumerate(bodies):
        (tmp_path / "g.yaml").write_text(body)
        if i == 0:   # once through the console script: exit code and stderr as a user sees them
            r = _xr0("sweep", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "s"))
            rc, err = r.returncode, r.stderr
        else:
            rc, err = cli_sweep([str(tmp_path / "g.yaml"), "--out", str(tmp_path / "s")]), capsys.readouterr().err
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (body, err)
    assert not (tmp_path / "s").exists()


def test_run_streams_stages_and_times(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("out_dir = 'x'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_markdown_cell("## Work: the main part"),
        nbformat.v4.new_code_cell("print('hello from the notebook')\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='bar'): pass"),
        nbformat.v4.new_markdown_cell("## Results"),
        nbformat.v4.new_code_cell("from xr0_lib.experiments import write_results\nwrite_results(out_dir, 'toy', {}, [])")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, tmp_path / "toy.ipynb")
    r = _xr0("run", str(tmp_path / "toy.ipynb"), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    for want in ("[toy] Work ...", "[toy] Work: done in", "[toy] Results ...", "hello from the notebook", "bar: 100%",
                 "[toy] total", f"executed notebook: {tmp_path / 'out' / 'toy.ipynb'}"):
        assert want in out, (want, out)
    assert "without encryption" not in out
