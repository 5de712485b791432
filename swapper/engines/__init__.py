"""Getting engine binaries where no package ships them: llama-server built from pinned sources.

`swapper install-engine llamacpp [--cuda|--hip]` (and the Makefile, and the container images)
run `build-llama-server.sh` beside this file, which compiles the llama.cpp vendored in the
llama-cpp-python sdist of `LLAMA_CPP_PYTHON_VERSION` into
`STATE_DIR/engines/llamacpp-VERSION-VARIANT/bin/llama-server`. The folder name is the cache key:
a second run with the same version and variant finds the binary and returns at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
VARIANTS = ("cpu", "cuda", "hip")
BUILD_SCRIPT = Path(__file__).with_name("build-llama-server.sh")


class EngineNotFound(RuntimeError):
    pass


def engine_dir(state_dir: Path, variant: str = "cpu", version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return state_dir / "engines" / f"llamacpp-{version}-{variant}"


def cached_llama_server(state_dir: Path, prefer: str = "cpu") -> Path | None:
    """A built llama-server in the cache: the preferred variant of the pinned version first."""
    order = [prefer] + [v for v in VARIANTS if v != prefer]
    for variant in order:
        p = engine_dir(state_dir, variant) / "bin" / "llama-server"
        if p.is_file() and os.access(p, os.X_OK):
            return p
    for p in sorted((state_dir / "engines").glob("llamacpp-*/bin/llama-server"), reverse=True):
        if os.access(p, os.X_OK):
            return p
    return None


def find_llama_server(explicit: str | None, command: list[str], state_dir: Path, prefer: str = "cpu") -> list[str]:
    """The llama-server command: --llama-server / SWAPPER_LLAMA_SERVER, a configured command,
    PATH, then the build cache. Raises EngineNotFound saying what to do."""
    if explicit:
        p = Path(os.path.expanduser(explicit))
        if p.is_file() and os.access(p, os.X_OK):
            return [str(p)]
        found = shutil.which(explicit)
        if found:
            return [found]
        raise EngineNotFound(f"llama-server '{explicit}' (from --llama-server / SWAPPER_LLAMA_SERVER) "
                             "does not exist or is not executable")
    if command and command != ["llama-server"]:
        return list(command)  # engines.llamacpp.command set in the config: used as written
    found = shutil.which("llama-server")
    if found:
        return [found]
    cached = cached_llama_server(state_dir, prefer)
    if cached:
        return [str(cached)]
    raise EngineNotFound(
        "llama-server not found (looked at --llama-server, $SWAPPER_LLAMA_SERVER, PATH and "
        f"{state_dir / 'engines'}). Build it once with `swapper install-engine llamacpp` "
        "(add --cuda or --hip for GPUs; ~4 minutes on 2 cores, cached), or point "
        "--llama-server at an existing binary.")


def install_llamacpp(state_dir: Path, variant: str = "cpu", version: str = LLAMA_CPP_PYTHON_VERSION,
                     jobs: int | None = None, force: bool = False) -> Path:
    """Build (or find in the cache) llama-server for a variant; returns the binary's path."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}")
    dest = engine_dir(state_dir, variant, version)
    binary = dest / "bin" / "llama-server"
    if binary.is_file() and not force:
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise EngineNotFound(f"building llama-server needs {tool}; install cmake and a C++ compiler "
                                 "(Debian/Ubuntu: apt-get install cmake g++)")
    jobs = jobs or os.cpu_count() or 2
    subprocess.run(["bash", str(BUILD_SCRIPT), version, variant, str(dest), str(jobs)], check=True)
    return binary
