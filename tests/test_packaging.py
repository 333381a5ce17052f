"""Packaging: the metadata, the sdist (which leaves the tests out: they need the repository), the wheel, and
`pip install .` into a clean virtual environment, then `gradwatch demo`.

The clean environment gets torch (and numpy, scikit-learn, matplotlib) by a ``.pth`` line pointing at the
test interpreter's site-packages, as if they were installed first: installing torch again per test run
would download gigabytes. Nothing is downloaded (``pip install --no-index``); gradwatch comes from the sdist.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ("src", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in")


def _project() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _env() -> dict[str, str]:
    """The environment without this test run's PYTHONPATH (src:tests would shadow the installed package)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def _run(argv: list, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def _copy_source(dest: Path) -> Path:
    """The files a build reads, without build leftovers (egg-info, __pycache__)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCE:
        src = ROOT / name
        (shutil.copytree(src, dest / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dest / name))
    return dest


_BUILD = "import sys; from setuptools import build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"


def _build(kind: str, tree: Path, out: Path) -> Path:
    """``build_sdist`` / ``build_wheel`` (PEP 517, no isolation: offline) of ``tree`` into ``out``."""
    name = _run([sys.executable, "-c", _BUILD, kind, out], cwd=tree).stdout.strip().splitlines()[-1]
    return out / name


def _unpack(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+: refuse links and paths out of dest
            archive.extractall(dest, filter="data")
        else:  # pragma: no cover
            archive.extractall(dest)


def test_metadata_names_the_license_urls_and_classifiers() -> None:
    project = _project()
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) == 202  # the Apache Software Foundation's text, unchanged
    assert {"Homepage", "Source", "Issues"} <= set(project["urls"])
    assert all(url.startswith("https://") for url in project["urls"].values())
    assert "Typing :: Typed" in project["classifiers"] and (ROOT / "src" / "gradwatch" / "py.typed").exists()
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # PEP 639: the expression says it
    trove = pytest.importorskip("trove_classifiers")
    assert [c for c in project["classifiers"] if c not in trove.classifiers] == []
    minor = [int(c.rsplit(".", 1)[1]) for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")]
    assert min(minor) == int(project["requires-python"].removeprefix(">=3."))


def test_sdist_and_wheel_hold_the_package_and_leave_the_tests_out(tmp_path: Path) -> None:
    tree = _copy_source(tmp_path / "tree")
    sdist = _build("build_sdist", tree, tmp_path / "dist")
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    _unpack(sdist, tmp_path / "unpacked")
    assert {"LICENSE", "README.md", "pyproject.toml", "src/gradwatch/py.typed", "src/gradwatch/__main__.py",
            "src/gradwatch/commands/doctor.py"} <= names
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "src" / "gradwatch").rglob("*.py")}
    assert sources <= names  # every module of the package
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))]  # left out on purpose
    # The wheel built from the unpacked sdist (what pip does with an sdist): package, typing marker, license.
    wheel = _build("build_wheel", tmp_path / "unpacked" / sdist.name.removesuffix(".tar.gz"), tmp_path / "wheels")
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        info = next(n for n in files if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(info))
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    dist_info = info.rsplit("/", 1)[0]
    assert {"gradwatch/py.typed", "gradwatch/__main__.py", "gradwatch/cli.py", f"{dist_info}/licenses/LICENSE"} <= files
    assert {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "gradwatch").rglob("*.py")} <= files
    assert not [n for n in files if n.startswith("tests/")]
    assert metadata["License-Expression"] == "Apache-2.0" and metadata["License-File"] == "LICENSE"
    assert metadata["Version"] == _version() and metadata["Requires-Python"] == ">=3.10"
    assert "Homepage, https://github.com/gradwatch/gradwatch" in metadata.get_all("Project-URL")
    assert set(metadata.get_all("Classifier")) == set(_project()["classifiers"])
    assert "gradwatch = gradwatch.cli:main" in entry_points


def _version() -> str:
    text = (ROOT / "src" / "gradwatch" / "__init__.py").read_text()
    return next(line.split('"')[1] for line in text.splitlines() if line.startswith("__version__"))


@pytest.mark.slow
def test_pip_install_into_a_clean_venv_then_gradwatch_demo(tmp_path: Path) -> None:
    """`pip install .` (of the unpacked sdist) into a fresh venv that already has torch, then `gradwatch demo`."""
    pip = pytest.importorskip("pip")
    if tuple(int(p) for p in pip.__version__.split(".")[:2]) < (22, 3):
        pytest.skip(f"pip {pip.__version__} has no --python (22.3+)")
    tree = _copy_source(tmp_path / "tree")
    sdist = _build("build_sdist", tree, tmp_path / "dist")
    _unpack(sdist, tmp_path / "unpacked")
    unpacked = tmp_path / "unpacked" / sdist.name.removesuffix(".tar.gz")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout.strip())
    shared = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_preinstalled.pth").write_text("".join(f"{p}\n" for p in shared))  # torch, numpy ... "installed first"
    # pip of this interpreter, installing into the venv (--python), offline: the dependencies are already there.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", "--no-build-isolation",
          unpacked], cwd=tmp_path, timeout=300)
    where = _run([python, "-c", "import gradwatch, torch; print(gradwatch.__file__); print(gradwatch.__version__)"],
                 cwd=tmp_path).stdout.split()
    assert Path(where[0]).is_relative_to(site) and where[1] == _version()  # the installed copy, not the source tree
    script = venv / ("Scripts/gradwatch.exe" if os.name == "nt" else "bin/gradwatch")
    assert _run([script, "--version"], cwd=tmp_path).stdout.strip() == f"gradwatch {_version()}"
    assert _run([python, "-m", "gradwatch", "--version"], cwd=tmp_path).stdout.strip() == f"gradwatch {_version()}"
    demo = _run([script, "demo", "--steps", "10", "--out", tmp_path / "demo"], cwd=tmp_path, timeout=300).stdout
    for variant in ("sigmoid-default", "relu-3x-init", "relu-kaiming-ln"):
        assert (tmp_path / "demo" / variant / "meta.json").exists() and variant in demo
    assert (tmp_path / "demo" / "gradient_by_depth.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([str(script), "doctor", str(tmp_path / "nowhere")], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
