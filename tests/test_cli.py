"""The gradwatch command: help, version, and one clear line + exit 2 on bad arguments."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from gradwatch import cli


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("gradwatch ")
    assert cli.main([]) == 2  # no command: help on stderr, exit 2
    assert "COMMAND" in capsys.readouterr().err


def test_unknown_command_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["no-such-command"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradwatch: error:") and "Traceback" not in err[0]


def test_console_script_runs_as_a_module() -> None:
    out = subprocess.run([sys.executable, "-m", "gradwatch.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("gradwatch ")


def test_closed_pipe_is_not_a_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """`gradwatch ... | head`: the reader leaves early; main returns quietly instead of a BrokenPipeError traceback."""

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    import torch

    import gradwatch as gw

    model = torch.nn.Linear(3, 1)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run")
    watch.step(lambda: model(torch.randn(4, 3)).pow(2).mean())
    watch.close()
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["doctor", str(tmp_path / "run")]) == 0


# ----- --debug, python -m gradwatch, shell completion, one line for an OS error ---------------------
FACTORY = "def raises():\n    raise RuntimeError('factory exploded')\n"


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_factory_error_is_one_line_naming_it_and_debug(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "factories_debug.py").write_text(FACTORY)
    target = f"{tmp_path / 'factories_debug.py'}:raises"
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["probe", target]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == f"gradwatch: error: {target}() failed: RuntimeError: factory exploded " \
                   "(rerun with --debug to see its traceback)"
    for argv, env in ((["--debug", "probe", target], None), (["probe", target, "--debug"], None), (["probe", target], "1")):
        if env:
            monkeypatch.setenv(cli.DEBUG_ENV, env)
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        # the user's traceback (their file, their line), then the same one line without the hint
        assert err[0] == "Traceback (most recent call last):"
        assert any("factories_debug.py\", line 2, in raises" in line for line in err)
        assert err[-2] == "RuntimeError: factory exploded"
        assert err[-1] == f"gradwatch: error: {target}() failed: RuntimeError: factory exploded"
    monkeypatch.setenv(cli.DEBUG_ENV, "0")  # 0 means off
    assert cli.main(["probe", target]) == 2
    assert "--debug" in _one_line(capsys.readouterr().err)


def test_an_unforeseen_error_is_one_line_and_debug_shows_where(monkeypatch, capsys, tmp_path) -> None:
    from gradwatch.commands import doctor

    def broken(args):  # an error of gradwatch's own, not foreseen by any except clause
        return {}["missing"]

    monkeypatch.setattr(doctor, "run", broken)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["doctor", str(tmp_path)]) == 2
    assert _one_line(capsys.readouterr().err) == \
        "gradwatch: error: unexpected KeyError: 'missing' (rerun with --debug to see the traceback)"
    assert cli.main(["--debug", "doctor", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "in broken" in err and err.strip().splitlines()[-1] == "gradwatch: error: unexpected KeyError: 'missing'"


def test_os_errors_are_one_line_with_the_path_and_a_hint() -> None:
    import errno

    assert cli._error_line(PermissionError(errno.EACCES, "Permission denied", "/x/r.html"), False) == \
        "gradwatch: error: Permission denied: '/x/r.html' (check its permissions, or pass another path)"
    assert cli._error_line(OSError(errno.ENOSPC, "No space left on device", "/x/r.html"), False) == \
        "gradwatch: error: No space left on device: '/x/r.html' (the disk is full)"
    assert cli._error_line(FileNotFoundError("'run' is not a gradwatch run directory"), False) == \
        "gradwatch: error: 'run' is not a gradwatch run directory"
    assert cli._error_line(ValueError("two\nlines   here"), False) == "gradwatch: error: two lines here"


def test_python_dash_m_gradwatch() -> None:
    out = subprocess.run([sys.executable, "-m", "gradwatch", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("gradwatch ")
    out = subprocess.run([sys.executable, "-m", "gradwatch", "doctor", "no/such/dir"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a gradwatch run directory" in out.stderr


def test_print_completion(capsys) -> None:
    pytest.importorskip("shtab")
    with pytest.raises(SystemExit) as info:
        cli.main(["--print-completion", "bash"])
    assert info.value.code == 0
    script = capsys.readouterr().out
    for word in ("complete", "gradwatch", "doctor", "probe", "report", "export", "--json", "--debug"):
        assert word in script, word
    assert "_shtab_compgen_dirs" in script  # RUN_DIR completes to directories
    bash = shutil.which("bash")
    if bash:  # the script completes in a real bash: `gradwatch do<TAB>`, `gradwatch doctor --<TAB>`
        probe = ('source /dev/stdin; COMP_WORDS=(gradwatch do); COMP_CWORD=1; _shtab_gradwatch; echo "${COMPREPLY[@]}"; '
                 'COMP_WORDS=(gradwatch doctor --); COMP_CWORD=2; _shtab_gradwatch; echo "${COMPREPLY[@]}"')
        out = subprocess.run([bash, "-c", probe], input=script, capture_output=True, text=True, timeout=60).stdout
        assert out.splitlines()[0] == "doctor" and {"--json", "--debug", "--help"} <= set(out.splitlines()[1].split())


def test_print_completion_without_shtab_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "shtab", None)  # import shtab -> ImportError
    assert cli.main(["--print-completion", "bash"]) == 2
    assert _one_line(capsys.readouterr().err) == \
        "gradwatch: error: shell completion needs shtab: pip install 'gradwatch[completion]'"
    assert cli.main(["--print-completion", "fish"]) == 2
    assert "invalid choice: 'fish'" in _one_line(capsys.readouterr().err)
