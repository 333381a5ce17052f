"""``gradwatch doctor --json``: one JSON object with the findings, counts, bundles and read problems; same exit codes."""

from __future__ import annotations

import json

from test_doctor import _run as train_run

from gradwatch.cli import main


def _strict(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_doctor_json_has_every_finding_and_the_counts(tmp_path, capsys) -> None:
    watch = train_run(tmp_path / "run", lr=0.01, steps=10, nan_at=4)
    assert main(["doctor", str(tmp_path / "run")]) == 1
    capsys.readouterr()
    assert main(["doctor", "--json", str(tmp_path / "run")]) == 1
    report = _strict(capsys.readouterr().out)
    assert report["steps"] == 10 and report["layers"] == 3
    assert report["skipped_steps"] == 1  # the NaN step (on_nonfinite="skip")
    severities = [f.severity for f in watch.findings]
    assert report["counts"] == {s: severities.count(s) for s in ("error", "warning", "info")}
    assert report["counts"]["error"] >= 1 and report["exit_code"] == 1
    assert [(f["code"], f["severity"], f["step"]) for f in report["findings"]] == \
        [(f.code, f.severity, f.step) for f in watch.findings]
    for finding in report["findings"]:
        assert set(finding) == {"code", "severity", "step", "message", "evidence", "location", "fixes"}
    bundles = sorted((tmp_path / "run" / "nonfinite").glob("*.pt"))
    assert [b["path"] for b in report["bundles"]] == [str(b) for b in bundles] and len(bundles) == 1
    assert report["bundles"][0]["description"].startswith("step_000004.pt: step 4")
    assert report["read_problems"] == [] and report["skipped_lines"] == {}


def test_doctor_json_healthy_run_exits_0_and_counts_skipped_lines(tmp_path, capsys) -> None:
    train_run(tmp_path / "run", lr=0.01, steps=10)
    with open(tmp_path / "run" / "steps.jsonl", "ab") as handle:
        handle.write(b'{"step": 11, "loss": \xff}\n{"step": 12, "lo')  # a non-UTF-8 line, then a cut-off one
    assert main(["doctor", "--json", str(tmp_path / "run")]) == 0
    report = _strict(capsys.readouterr().out)
    assert report["exit_code"] == 0 and report["counts"]["error"] == 0 and report["steps"] == 10
    assert report["skipped_lines"] == {"steps.jsonl": 2}
    assert report["read_problems"] == ["steps.jsonl: 2 unreadable line(s) skipped (first: line 11, not UTF-8)"]


def test_doctor_json_bad_path_is_one_line_exit_2(tmp_path, capsys) -> None:
    assert main(["doctor", "--json", str(tmp_path / "nowhere")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
