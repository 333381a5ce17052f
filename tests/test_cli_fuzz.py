"""Damaged run directories: every read command reads what is left or says one line (exit 2), never a traceback.

A real run directory (a short Watch run with a NaN step, so that it has findings,
a reproduction bundle, activations and events) is copied, one of its files is
damaged in one of many ways, and ``doctor``, ``doctor --json``, ``report`` and
``export`` run on it in-process through ``gradwatch.cli.main``. Per file and
kind of damage: no exception escapes, no traceback is printed, and the run is
read (exit 0 or 1: one damaged file never loses a whole run), with what was
lost named in ``read_problems`` / ``skipped_lines``; line-level damage costs
exactly the damaged lines. Exit 2, one stderr line, is left for a directory
that holds no run at all and for outputs that cannot be written. The bulk runs
the report without its matplotlib charts (seconds each);
``test_report_charts_on_damaged_runs`` draws them for the damages most likely
to reach them.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from test_doctor import _run as train_run

import gradwatch as gw
from gradwatch.cli import main

N_STEPS, NAN_STEP = 12, 5
RUN_FILES = ("meta.json", "layers.json", "steps.jsonl", "findings.jsonl", "activations.jsonl", "events.jsonl",
             "grad_norms.f32", "weight_norms.f32", "nonfinite/step_000005.pt")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 steps of a 3-layer ReLU MLP, step 5 fed a NaN batch (a finding and a bundle)."""
    path = tmp_path_factory.mktemp("fuzz") / "run"
    train_run(path, lr=0.01, steps=N_STEPS, nan_at=NAN_STEP)
    assert {p.name for p in path.iterdir()} >= {Path(name).parts[0] for name in RUN_FILES}
    return path


# ----- damage: each a function of the file's bytes -> new bytes, or a marker ---------------
DELETE, DIRECTORY, UNREADABLE, DANGLING, FIFO = "delete", "directory", "unreadable", "dangling", "fifo"


def _lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line.strip()]


def _each_json(data: bytes, change: Callable[[object], object]) -> bytes:
    """Every JSON value of the file (the whole file, or each line of a .jsonl) replaced by ``change(value)``."""
    try:
        return (json.dumps(change(json.loads(data))) + "\n").encode()
    except ValueError:  # JSONL
        return b"".join(json.dumps(change(json.loads(line))).encode() + b"\n" for line in _lines(data))


_SWAP = {list: "x", dict: 5, str: {"a": 1}, int: [1], float: [1.5], bool: "yes", type(None): []}


def _swap_types(value: object, depth: int) -> object:
    """Each value (to ``depth`` levels of nesting) replaced by one of another JSON type."""
    if isinstance(value, dict) and depth > 0:
        return {k: _swap_types(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list) and depth > 0:
        return [_swap_types(v, depth - 1) for v in value]
    return _SWAP[type(value)]


def _numbers(value: object, new: object) -> object:
    """Every number (not bool) in a JSON value replaced by ``new``."""
    if isinstance(value, dict):
        return {k: _numbers(v, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v, new) for v in value]
    return new if isinstance(value, (int, float)) and not isinstance(value, bool) else value


BYTE_DAMAGE: dict[str, Callable[[bytes], bytes] | str] = {
    "delete": DELETE,
    "directory": DIRECTORY,
    "unreadable": UNREADABLE,
    "dangling-symlink": DANGLING,
    "named-pipe": FIFO,  # reading one would wait for a writer for ever
    "empty": lambda d: b"",
    "half": lambda d: d[: len(d) // 2],
    "cut-5-bytes": lambda d: d[:-5],
    "not-utf8": lambda d: d[:8] + b"\xff\xfe\xc3\x28" + d[8:],
    "garbage": lambda d: bytes(range(256)) * 4,
    "nul-bytes": lambda d: b"\x00" * len(d),
    "json-array": lambda d: b"[]",
    "json-null": lambda d: b"null",
    "json-string": lambda d: b'"run"',
    "json-number": lambda d: b"42",
    "doubled": lambda d: d + d,
    "reversed-lines": lambda d: b"\n".join(reversed(d.split(b"\n"))),
    "crlf": lambda d: d.replace(b"\n", b"\r\n"),
    "three-bytes-more": lambda d: d + b"\x01\x02\x03",
    "one-row-less": lambda d: d[: max(0, len(d) - 12)],
}
JSON_DAMAGE: dict[str, Callable[[object], object]] = {
    "every-value-an-array": lambda v: [],
    "every-value-empty": lambda v: {},
    "types-swapped": lambda v: _swap_types(v, 1),
    "types-swapped-deep": lambda v: _swap_types(v, 3),
    "numbers-huge": lambda v: _numbers(v, 10**400),
    "numbers-inf": lambda v: _numbers(v, 1e999),
    "numbers-negative": lambda v: _numbers(v, -7),
    "numbers-nan-strings": lambda v: _numbers(v, "nan"),
    "numbers-fractional": lambda v: _numbers(v, 2.5),
    "numbers-zero": lambda v: _numbers(v, 0),
}


def _damage(run: Path, name: str, how: str) -> None:
    path = run / name
    data = path.read_bytes()
    path.unlink()
    if how in JSON_DAMAGE:
        path.write_bytes(_each_json(data, JSON_DAMAGE[how]))
        return
    damage = BYTE_DAMAGE[how]
    if damage == DIRECTORY:
        path.mkdir()
        (path / "inside.txt").write_text("a directory where a file was")
    elif damage == DANGLING:
        path.symlink_to(run / "no-such-file")
    elif damage == FIFO:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no named pipes here")
        os.mkfifo(path)
    elif damage == UNREADABLE:
        path.write_bytes(data)
        path.chmod(0)
    elif damage != DELETE:
        path.write_bytes(damage(data))  # type: ignore[operator]


@pytest.fixture()
def unreadable_as_root(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """chmod 000 stops every user but root: as root, opening a file with no permission bits raises as it would."""

    def arm(run: Path) -> None:
        if os.geteuid() != 0:
            return
        real_open = builtins.open

        def fake_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
            if isinstance(file, (str, os.PathLike)) and Path(file).exists() and Path(file).stat().st_mode & 0o777 == 0:
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)

    return arm


@pytest.fixture()
def quick_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report without its matplotlib charts (3 s each here); test_report_charts_on_damaged_runs draws them."""
    from gradwatch.report import figures

    monkeypatch.setattr(figures, "FIGURES", ())


def _call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except BaseException as exc:  # SystemExit too: nothing may escape main on a damaged run
        pytest.fail(f"{argv[0]} raised {type(exc).__name__}: {exc}")
    out, err = capsys.readouterr()
    return rc, out, err


def _read_commands(run: Path, out: Path) -> dict[str, list[str]]:
    return {
        "doctor": ["doctor", str(run)],
        "doctor --json": ["doctor", "--json", str(run)],
        "report": ["report", str(run), "-o", str(out / "report.html")],
        "export": ["export", "--tensorboard", str(run), str(out / "tb")],
    }


def _check_every_command(run: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, tuple[int, str, str]]:
    results = {}
    for label, argv in _read_commands(run, out).items():
        rc, stdout, stderr = _call(argv, capsys)
        assert rc in (0, 1, 2), (label, rc)
        assert "Traceback" not in stdout + stderr, (label, stderr)
        if rc == 2:
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("gradwatch: error:"), (label, stderr)
            assert "unexpected" not in lines[0], (label, lines[0])  # the last-resort catch is not how we cope
        results[label] = (rc, stdout, stderr)
    return results


#: Steps left when steps.jsonl is damaged so (worked out from the damage; None: not checked).
STEPS_LEFT = {"doubled": N_STEPS, "reversed-lines": N_STEPS, "crlf": N_STEPS, "three-bytes-more": N_STEPS,
              "cut-5-bytes": N_STEPS - 1, "one-row-less": N_STEPS - 1, "not-utf8": N_STEPS - 1,
              "numbers-negative": 1, "numbers-zero": 1,  # every line says step -7 (or 0): one step, the last line
              "numbers-fractional": 0, "numbers-huge": 0, "numbers-inf": 0, "numbers-nan-strings": 0,
              "every-value-an-array": 0, "every-value-empty": 0, "types-swapped": 0,
              "empty": 0, "delete": 0, "directory": 0, "unreadable": 0, "dangling-symlink": 0, "named-pipe": 0, "garbage": 0,
              "nul-bytes": 0, "json-array": 0, "json-null": 0, "json-string": 0, "json-number": 0}


DAMAGES = [(name, how) for name in RUN_FILES
           for how in list(BYTE_DAMAGE) + (list(JSON_DAMAGE) if name.endswith((".json", ".jsonl")) else [])]


@pytest.mark.parametrize("name,how", DAMAGES, ids=[f"{name}-{how}" for name, how in DAMAGES])
def test_a_damaged_file_never_costs_a_traceback(real_run: Path, tmp_path: Path, name: str, how: str,
                                                 capsys: pytest.CaptureFixture[str], quick_figures: None,
                                                 unreadable_as_root: Callable[[Path], None]) -> None:
    run = tmp_path / "run"
    shutil.copytree(real_run, run, symlinks=True)
    _damage(run, name, how)
    unreadable_as_root(run)
    results = _check_every_command(run, tmp_path, capsys)
    # One damaged file never makes a whole run unreadable: meta.json or steps.jsonl is left.
    for label, (rc, stdout, stderr) in results.items():
        assert rc in (0, 1), (label, stderr)
    doctor = json.loads(results["doctor --json"][1])
    assert doctor["exit_code"] == results["doctor"][0] == results["doctor --json"][0]
    intact = json.loads(json.dumps(doctor))  # plain JSON: no NaN, no objects
    assert isinstance(intact["findings"], list) and isinstance(intact["skipped_lines"], dict)
    steps_left = STEPS_LEFT.get(how) if name == "steps.jsonl" else N_STEPS  # other files never cost a step
    if steps_left is not None:
        assert doctor["steps"] == steps_left, (how, doctor["read_problems"], doctor["skipped_lines"])

def test_unreadable_file_is_named_in_read_problems(real_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   unreadable_as_root: Callable[[Path], None]) -> None:
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    _damage(run, "findings.jsonl", UNREADABLE)
    unreadable_as_root(run)
    rc, out, _ = _call(["doctor", "--json", str(run)], capsys)
    report = json.loads(out)
    assert rc == 0 and report["counts"]["error"] == 0  # the one error finding was in the unreadable file
    assert report["read_problems"] == ["findings.jsonl: cannot be read (Permission denied); read without it"]
    assert report["steps"] == N_STEPS


# ----- line-level damage: the damaged line is skipped and counted, the others are read ------------
LINE_DAMAGE = {
    "not-utf8": lambda line: line[:5] + b"\xff" + line[5:],
    "cut-off": lambda line: line[: len(line) // 2],
    "json-array": lambda line: b"[1, 2]",
    "step-a-string": lambda line: line.replace(b'"step":', b'"step":"seven","was":'),
    "loss-a-list": lambda line: line.replace(b'"loss":', b'"loss":[0],"was":'),
    "row-fractional": lambda line: re.sub(rb'"row":\d+', b'"row":2.5', line),
    "update-ratio-a-string": lambda line: line.replace(b'"update_ratio":', b'"update_ratio":"x","was":'),
}


@pytest.mark.parametrize("how", LINE_DAMAGE)
def test_a_bad_steps_line_is_skipped_and_counted(real_run: Path, tmp_path: Path, how: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    lines = (run / "steps.jsonl").read_bytes().split(b"\n")
    damaged = 3 if how != "update-ratio-a-string" else 2  # step 2's line has an update ratio (first 2 steps)
    lines[damaged - 1] = LINE_DAMAGE[how](lines[damaged - 1])
    (run / "steps.jsonl").write_bytes(b"\n".join(lines))
    original, loaded = gw.load_run(real_run), gw.load_run(run)
    kept = [s for s in range(1, N_STEPS + 1) if s != damaged]
    assert loaded.steps["step"].tolist() == kept
    assert loaded.skipped_lines == {"steps.jsonl": 1}
    keep = np.array(kept) - 1  # the other steps' numbers, per-layer rows included, are the original ones
    for column in ("loss", "grad_norm", "layer_grad_norms", "layer_weight_norms", "update_ratio"):
        np.testing.assert_array_equal(loaded.steps[column], original.steps[column][keep])
    rc, out, _ = _call(["doctor", str(run)], capsys)
    assert rc == 1  # step 5's degenerate_batch error is still found
    assert f"run {run}: {N_STEPS - 1} steps, 3 layers, 1 skipped" in out
    assert f"steps.jsonl: 1 unreadable line(s) skipped (first: line {damaged}," in out
    rc, out, _ = _call(["doctor", "--json", str(run)], capsys)
    assert json.loads(out)["skipped_lines"] == {"steps.jsonl": 1} and rc == 1


def test_bad_lines_in_each_stream_are_counted(real_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A non-UTF-8 byte in a line of every .jsonl file: that line goes, and the count says so, file by file."""
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    expected = {}
    for name in ("steps.jsonl", "findings.jsonl", "activations.jsonl", "events.jsonl"):
        lines = (run / name).read_bytes().split(b"\n")
        lines.insert(1, b'{"step": 3, "note": "\xff\xfe"}')
        (run / name).write_bytes(b"\n".join(lines))
        expected[name] = 1
    original, loaded = gw.load_run(real_run), gw.load_run(run)
    assert loaded.skipped_lines == expected
    assert len(loaded.findings) == len(original.findings) and len(loaded.events) == len(original.events)
    assert len(loaded.activations) == len(original.activations)
    assert loaded.steps["step"].tolist() == original.steps["step"].tolist()
    report = json.loads(_call(["doctor", "--json", str(run)], capsys)[1])
    assert report["skipped_lines"] == expected
    assert original.problems == [] and original.skipped_lines == {}  # the real run itself reads clean


def test_repeated_steps_keep_the_last_record(real_run: Path, tmp_path: Path) -> None:
    """A step written twice (the same line, or a corrected one after it): one record per step, the last one."""
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    lines = (run / "steps.jsonl").read_text().splitlines()
    again = json.loads(lines[3])
    again["loss"] = 123.0
    (run / "steps.jsonl").write_text("\n".join(lines + [lines[0], json.dumps(again)]) + "\n")
    loaded = gw.load_run(run)
    assert loaded.steps["step"].tolist() == list(range(1, N_STEPS + 1))
    assert loaded.steps["loss"][3] == 123.0
    assert loaded.problems == ["steps.jsonl: 2 record(s) repeat an earlier step number; the last of each is kept"]


def test_matrix_rows_past_the_end_read_as_nan(real_run: Path, tmp_path: Path) -> None:
    """grad_norms.f32 cut 2 bytes into its last row (a kill): the last step's per-layer norms are NaN, the others exact."""
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    data = (run / "grad_norms.f32").read_bytes()
    (run / "grad_norms.f32").write_bytes(data[: -3 * 4 + 2])  # a row is 3 layers x 4 bytes
    original, loaded = gw.load_run(real_run), gw.load_run(run)
    np.testing.assert_array_equal(loaded.steps["layer_grad_norms"][:-1], original.steps["layer_grad_norms"][:-1])
    assert np.isnan(loaded.steps["layer_grad_norms"][-1]).all()
    assert loaded.problems == [
        "grad_norms.f32: ends in a partial row (2 bytes, ignored): its size is not a multiple of 3 layers x 4 bytes",
        f"grad_norms.f32: holds {N_STEPS - 1} row(s); 1 step(s) point past its end (their values read as NaN)",
    ]


def test_without_layers_json_the_layers_are_named_by_position(real_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    (run / "layers.json").write_text('{"layers": 3}')
    original, loaded = gw.load_run(real_run), gw.load_run(run)
    assert loaded.layer_names == ["layer 0", "layer 1", "layer 2"]  # width from the update-ratio lists
    np.testing.assert_array_equal(loaded.steps["layer_grad_norms"], original.steps["layer_grad_norms"])
    assert loaded.problems == ["layers.json: has no list under 'layers'; layers named by position"]


# ----- the directory itself, and where the output goes ----------------------------------------------
@pytest.mark.parametrize("how", ["a-file", "empty-dir", "only-a-subfolder", "meta-and-steps-gone", "missing"])
def test_no_run_at_all_is_one_line_exit_2(real_run: Path, tmp_path: Path, how: str,
                                          capsys: pytest.CaptureFixture[str], quick_figures: None) -> None:
    run = tmp_path / "run"
    if how == "a-file":
        run.write_text("not a directory")
    elif how == "empty-dir":
        run.mkdir()
    elif how == "only-a-subfolder":
        (run / "nonfinite").mkdir(parents=True)
    elif how == "meta-and-steps-gone":
        shutil.copytree(real_run, run)
        (run / "meta.json").unlink()
        (run / "steps.jsonl").unlink()
    for label, argv in _read_commands(run, tmp_path).items():
        rc, out, err = _call(argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "is not a gradwatch run directory" in lines[0], (label, err)


def test_nonfinite_a_file_lists_no_bundles(real_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    shutil.rmtree(run / "nonfinite")
    (run / "nonfinite").write_text("a file where the bundles' folder was")
    rc, out, _ = _call(["doctor", "--json", str(run)], capsys)
    assert rc == 1 and json.loads(out)["bundles"] == [] and json.loads(out)["steps"] == N_STEPS


def test_both_run_files_damaged_still_reads(real_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """meta.json `[]` and steps.jsonl a directory: what is left (layers, matrices, findings) is still shown."""
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    (run / "meta.json").write_text("[]")
    (run / "steps.jsonl").unlink()
    (run / "steps.jsonl").mkdir()
    rc, out, _ = _call(["doctor", str(run)], capsys)
    assert rc == 1 and f"run {run}: 0 steps, 3 layers, 0 skipped" in out
    assert "meta.json: holds a JSON array, not an object; read without it" in out
    assert "steps.jsonl: is a directory, not a file; read without it" in out
    assert "degenerate_batch" in out


@pytest.mark.parametrize("output", ["afile/x.html", "afile/deeper/x.html"])
def test_report_under_a_regular_file_is_one_line(real_run: Path, tmp_path: Path, output: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("I am a file")
    rc, _, err = _call(["report", str(real_run), "-o", str(tmp_path / output)], capsys)
    assert rc == 2 and err.strip() == (f"gradwatch: error: cannot write {str(tmp_path / output)!r}: "
                                       f"{str(tmp_path / 'afile')!r} is a file, not a folder; pass a path inside a folder")
    for argv in (["export", "--tensorboard", str(real_run), str(tmp_path / "afile" / "tb")],
                 ["demo", "--steps", "1", "--out", str(tmp_path / "afile" / "demo")]):
        rc, _, err = _call(argv, capsys)
        assert rc == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "afile").is_dir()


def test_report_into_a_read_only_folder_is_one_line(real_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch, quick_figures: None) -> None:
    """The HTML cannot be written (no permission; simulated, since root may write anywhere): one line naming the file."""
    from pathlib import Path as PathType

    def refuse(self: PathType, *args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(PathType, "write_text", refuse)
    rc, _, err = _call(["report", str(real_run), "-o", str(tmp_path / "r.html")], capsys)
    assert rc == 2
    assert err.strip() == (f"gradwatch: error: Permission denied: {str(tmp_path / 'r.html.tmp')!r} "
                           "(check its permissions, or pass another path)")


@pytest.mark.slow
@pytest.mark.parametrize("name,how", [("steps.jsonl", "types-swapped"), ("activations.jsonl", "types-swapped-deep"),
                                      ("events.jsonl", "types-swapped-deep"), ("grad_norms.f32", "half"),
                                      ("layers.json", "json-array")])
def test_report_charts_on_damaged_runs(real_run: Path, tmp_path: Path, name: str, how: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The real charts (matplotlib) on the damages most likely to reach them: the page is written, exit 0."""
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    _damage(run, name, how)
    rc, out, err = _call(["report", str(run), "-o", str(tmp_path / "r.html")], capsys)
    assert rc == 0 and out.strip() == str(tmp_path / "r.html") and "Traceback" not in err
    assert "<html" in (tmp_path / "r.html").read_text()
