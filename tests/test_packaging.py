"""The package builds cleanly and carries its data: presets, static pages, build script, licence."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("dist")
    # built from a clean copy, as an image build or a fresh clone would: a checkout's own
    # *.egg-info and build/ (left by the editable install) would hide missing package data
    src = tmp_path_factory.mktemp("src") / "swapper"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "models", "artifacts", "__pycache__", ".gpu", ".whl"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # its own warning
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return next(out.glob("swapper-*.whl")), r.stdout + r.stderr


def test_the_wheel_builds_without_warnings(wheel):
    _, log = wheel
    noisy = [ln for ln in log.splitlines() if "warn" in ln.lower() and "is ignored: it is neither" not in ln]
    assert not noisy, "\n".join(noisy)


def test_the_wheel_carries_presets_pages_build_script_and_licence(wheel):
    names = set(zipfile.ZipFile(wheel[0]).namelist())
    for name in ("swapper/presets/cpu.yaml", "swapper/static/control.html", "swapper/engines/build-llama-server.sh"):
        assert name in names, f"{name} missing from the wheel"
    assert any(n.endswith("licenses/LICENSE") for n in names)
    data = [p.relative_to(REPO).as_posix() for p in (REPO / "swapper").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    missing = [name for name in data if name not in names]
    assert not missing, f"package data missing from the wheel: {missing}"
    assert (REPO / "LICENSE").read_text().startswith("MIT License")


def test_presets_work_from_a_plain_install(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel[0])],
                   check=True, capture_output=True, timeout=300)
    code = ("import swapper, swapper.settings_load as c; print(swapper.__file__); "
            "print(c.load_settings(env={}, preset='cpu').device)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(target)}, timeout=60)
    assert r.returncode == 0, r.stderr
    where, device = r.stdout.split()
    assert where.startswith(str(target)), "imported the installed copy, not the source tree"
    assert device == "cpu"
