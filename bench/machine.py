"""What the numbers were measured on: CPU, cores, memory, GPU, versions and load.

Shared machines drift, so the load average before and after a run goes into the report next
to the hardware: a reader can tell a quiet run from a noisy one.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpus() -> str:
    """GPUs nvidia-smi lists, or 'none'."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "none"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return "; ".join(out.splitlines()) or "none"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "swapper"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (rev or "unknown") + (" (swapper/ has uncommitted changes)" if dirty else "")


def llama_server_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")]
    return lines[0].removeprefix("version:").strip() if lines else "unknown"


def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def describe(binary: str) -> dict[str, str]:
    from swapper import __version__

    vm = psutil.virtual_memory()
    return {
        "CPU": cpu_model(),
        "cores": f"{psutil.cpu_count(logical=False) or '?'} physical / {os.cpu_count()} logical",
        "RAM": f"{vm.total / (1 << 30):.1f} GiB",
        "GPU": gpus(),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": sys.version.split()[0],
        "llama-server": f"{llama_server_version(binary)} (CPU build: {binary})",
        "swapper": f"{__version__}, git {git_revision()}",
    }
