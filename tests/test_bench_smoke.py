"""The benchmark runner runs end to end and prints its tables (no timing is asserted: benchmarks
are not tests; `make bench` is where the numbers come from)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_bench_quick_smoke_prints_a_table(tmp_path: Path, llama_server_bin: str) -> None:
    out = tmp_path / "RESULTS.md"
    env = {**os.environ, "SWAPPER_LLAMA_SERVER": llama_server_bin}
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--smoke", "--out", str(out),
                        "--workdir", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=580, env=env, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-4000:]
    for title in ("## Goals", "## 1. Proxy overhead", "## 2. Swap latency", "## 3. Scale",
                  "## 4. Budget fidelity", "## 5. Page cache"):
        assert title in r.stdout, f"{title!r} missing:\n{r.stdout[-3000:]}"
    assert "| workload | conc. | metric | direct | swapper | router | swapper/direct | swapper/router |" in r.stdout
    assert ("| workload | conc. | unit | front: swapper | front: router | swapper/router (rounds) "
            "| total ms/request: direct | total: swapper | total: router |") in r.stdout, "the CPU-per-request table"
    assert "| stream, pooled | 1 | ms/request |" in r.stdout, "streams from a client that keeps its connection"
    assert ("| workload | conc. | metric | swapper ÷ its engine | router ÷ its engine | swapper/router |"
            in r.stdout), "each front against its own engine"
    assert "**Failed:**" not in r.stdout
    assert "Failed requests:" not in r.stdout, "every request of the CPU table answered"
    assert out.read_text() == r.stdout


@pytest.mark.timeout(300)
def test_stream_rate_compares_each_front_over_its_own_engine(tmp_path: Path, llama_server_bin: str) -> None:
    out = tmp_path / "RESULTS-streams.md"
    env = {**os.environ, "SWAPPER_LLAMA_SERVER": llama_server_bin}
    r = subprocess.run([sys.executable, str(REPO / "bench" / "stream_rate.py"), "--rounds", "2", "--streams", "2",
                        "--tokens", "8", "--out", str(out)],
                       capture_output=True, text=True, timeout=280, env=env, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-4000:]
    text = out.read_text()
    assert text == r.stdout
    assert "Failed requests: none." in text
    for row in ("| swapper ÷ its engine |", "| router ÷ its engine |", "| swapper/router, each over its own engine |"):
        assert row in text, f"{row!r} missing:\n{text[-3000:]}"
    rounds = [line for line in text.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rounds) == 2, "one line per round"
    assert all(float(cell) > 0 for line in rounds for cell in line.strip("|").split("|")[1:6]), rounds


@pytest.mark.timeout(300)
def test_stream_rate_identical_compares_three_engines_started_alike(tmp_path: Path, llama_server_bin: str) -> None:
    env = {**os.environ, "SWAPPER_LLAMA_SERVER": llama_server_bin}
    r = subprocess.run([sys.executable, str(REPO / "bench" / "stream_rate.py"), "--identical", "--rounds", "2",
                        "--streams", "2", "--tokens", "8"],
                       capture_output=True, text=True, timeout=280, env=env, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-4000:]
    pairs = [line for line in r.stdout.splitlines() if line.startswith("| llama-server ") and " / " in line]
    assert [line.split("|")[1].strip() for line in pairs] == [
        "llama-server 2 / llama-server 1", "llama-server 3 / llama-server 1", "llama-server 3 / llama-server 2"]
    assert all(float(line.split("|")[2]) > 0 for line in pairs), pairs
