"""benchmarks/gpu_check.py: every check passes on the CPU at tiny sizes; on CUDA (marked) the real ones."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import gpu_check  # noqa: E402


def test_every_check_passes_on_the_cpu_at_tiny_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    assert gpu_check.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[1].strip() for r in rows] == ["norms_float32", "norms_bfloat16", "fp16_scaler", "nan_replay", "host_syncs",
                                           "step_time_gpt_mini", "step_time_gpt2_tiny"]
    assert all(r[2].strip() == "yes" for r in rows)
    nan = next(r for r in rows if r[1].strip() == "nan_replay")
    assert "aten.log" in nan[3] and f"gpu_check.py:{gpu_check._line_of('NAN-LINE')}" in nan[3]


def test_a_failing_check_is_a_row_and_the_exit_code_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "check_fp16", broken)
    rows = gpu_check.run_checks(torch.device("cpu"), gpu_check.TINY)
    failed = [r for r in rows if not r.ok]
    assert [r.check for r in failed] == ["fp16_scaler"] and "RuntimeError: boom" in failed[0].result


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_it_says_so_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.cuda
def test_the_cuda_checks_pass_on_a_gpu() -> None:
    device = torch.device("cuda")
    for row in (gpu_check.check_norms(device, torch.float32, gpu_check.TINY),
                gpu_check.check_norms(device, torch.bfloat16, gpu_check.TINY),
                gpu_check.check_fp16(device, gpu_check.TINY),
                gpu_check.check_nan_replay(device),
                gpu_check.check_syncs(device, gpu_check.TINY)):
        assert row.ok, row
