"""llama.cpp's own router tests (`tools/server/tests/unit/test_router.py` of the llama.cpp that
swapper builds, from the llama-cpp-python sdist on PyPI) run against `swapper serve`.

Nothing of theirs is kept in this repository: the sdist is fetched once into the state dir's
cache (`pip download`, the only network this needs), its tests folder is unpacked for the run,
and our adapter (tests/llamacpp_router/) starts swapper where their harness starts llama-server.
The models their tests name are written into a local Hugging Face cache under the same repo
names: the real Gemma 3 270M as ggml-org/tinygemma3-GGUF:Q8_0, synthetic GGUFs as the stories
models. 15 of the 17 tests must pass; the 2 that need the Hub itself must be reported skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO, synth_file
from llamacpp_router.hub_cache import write_repo
from swapper.engines import LLAMA_CPP_PYTHON_VERSION
from swapper.process import free_port

pytestmark = pytest.mark.real

SDIST_DIR = Path(os.environ.get("SWAPPER_SDIST_CACHE", Path.home() / ".cache" / "swapper" / "sdist"))
ADAPTER = REPO / "tests" / "llamacpp_router"
SUITE = "vendor/llama.cpp/tools/server/tests"


def sdist() -> Path:
    """llama-cpp-python's sdist (the one swapper builds llama-server from), fetched once."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    path = SDIST_DIR / name
    if not path.exists():
        SDIST_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                        "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(SDIST_DIR)],
                       check=True)
    return path


def unpack_suite(dest: Path) -> Path:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/{SUITE}/"
    with tarfile.open(sdist()) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(prefix):] or "."
        tar.extractall(dest, members=members, filter="data")
    (dest / "tmp").mkdir(exist_ok=True)  # the harness's scratch folder (TMP_DIR in utils.py)
    return dest


def write_cache(cache: Path, gemma: Path) -> None:
    """The models test_router.py names, under their repo names and llama.cpp's file tags."""
    write_repo(cache, "ggml-org/tinygemma3-GGUF", {"tinygemma3-Q8_0.gguf": gemma})
    write_repo(cache, "ggml-org/test-model-stories260K", {"stories260K-F32.gguf": synth_file(8, 11)})
    write_repo(cache, "ggml-org/test-model-stories260K-infill", {"stories260K-infill-F32.gguf": synth_file(8, 12)})
    # what test_router_delete_model deletes (it would download it first if it were missing)
    write_repo(cache, "ggml-org/test-model-router-download", {"test-model-router-download-F16.gguf": synth_file(8, 13)})


def wrapper(path: Path, state: Path) -> Path:
    """An executable their harness runs as llama-server: `swapper serve` with the same words."""
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -m swapper serve --state-dir {state} \"$@\"\n")
    path.chmod(0o755)
    return path


def test_llama_cpp_router_suite_passes_against_swapper(tmp_path: Path, gemma_file: Path, llama_server_bin: str):
    suite = unpack_suite(tmp_path / "suite")
    cache = tmp_path / "hub"
    write_cache(cache, gemma_file)
    report = tmp_path / "report.xml"
    env = {**os.environ, "LLAMA_SERVER_BIN_PATH": str(wrapper(tmp_path / "llama-server", tmp_path / "state")),
           "LLAMA_CACHE": str(cache), "PORT": str(free_port()), "SWAPPER_LLAMA_SERVER": llama_server_bin,
           "PYTHONPATH": os.pathsep.join([str(ADAPTER), str(REPO)])}
    env.pop("DEBUG", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "swapper_adapter", "-p", "no:cacheprovider",
                          "unit/test_router.py", f"--junitxml={report}", "-rs"],
                         cwd=suite, env=env, capture_output=True, text=True, timeout=1500)
    out = run.stdout[-6000:] + run.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    outcome: dict[str, str] = {}
    for c in cases:
        kinds = [child.tag for child in c]
        outcome[c.get("name", "")] = ("failed" if {"failure", "error"} & set(kinds)
                                      else "skipped" if "skipped" in kinds else "passed")
    failed = sorted(n for n, o in outcome.items() if o == "failed")
    skipped = sorted(n for n, o in outcome.items() if o == "skipped")
    passed = [n for n, o in outcome.items() if o == "passed"]
    print(f"llama.cpp router suite against swapper: {len(passed)} passed, {len(failed)} failed, "
          f"{len(skipped)} skipped of {len(outcome)}")
    assert not failed, f"failed: {failed}\n{out}"
    assert len(outcome) == 17, f"expected 17 tests in test_router.py, ran {len(outcome)}\n{out}"
    assert skipped == ["test_router_download_model", "test_router_remote_preset"], out
    assert len(passed) == 15, out
    assert "needs the Hugging Face Hub (network)" in run.stdout, "skips say why"


def test_llama_args_table_matches_the_llama_cpp_swapper_builds():
    """swapper/llama_args.json is what `python -m swapper.llama_args` extracts from this arg.cpp."""
    from swapper.llama_args import TABLE, extract

    member = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/common/arg.cpp"
    with tarfile.open(sdist()) as tar:
        f = tar.extractfile(member)
        assert f is not None
        source = f.read().decode()
    import json

    assert json.loads(TABLE.read_text())["options"] == extract(source), \
        "regenerate: python -m swapper.llama_args vendor/llama.cpp/common/arg.cpp > swapper/llama_args.json"
