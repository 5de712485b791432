"""`swapper systemd-unit`: checked by systemd's own parser, then run the way systemd would run it.

`systemd-analyze verify` rejects what systemd cannot load; with SYSTEMD_LOG_LEVEL=debug it also
dumps the unit as systemd parsed it (Environment= after unquoting and specifier expansion,
ExecStart= as a command line), which the tests feed back into swapper.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests_shim as rq

from conftest import free_port
from swapper.settings_load import load_settings, render_yaml

SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def unit_text(*flags: str, env: dict[str, str] | None = None) -> str:
    """Run the real CLI, as an operator would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SWAPPER_")}
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-m", "swapper", "systemd-unit", *flags], capture_output=True,
                         text=True, env=full_env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def verify(text: str, tmp_path: Path) -> dict[str, list[str]]:
    """`systemd-analyze verify` must accept the unit without a word about it; returns the parsed dump."""
    unit = tmp_path / "swapper.service"
    unit.write_text(text)
    quiet = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (quiet.stdout + quiet.stderr).splitlines() if "swapper.service" in ln]
    assert quiet.returncode == 0 and not complaints, quiet.stdout + quiet.stderr
    dump = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug"})
    parsed: dict[str, list[str]] = {}
    for line in (dump.stdout + dump.stderr).splitlines():
        if line.startswith("\t") and ": " in line:
            key, _, value = line.strip().partition(": ")
            parsed.setdefault(key, []).append(value)
    assert parsed.get("Environment"), "the debug dump of the unit was not found"
    return parsed


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


def parsed_env(parsed: dict[str, list[str]]) -> dict[str, str]:
    return dict(e.split("=", 1) for e in parsed["Environment"])


def test_verify_rejects_what_systemd_cannot_run(tmp_path):
    good = unit_text("--models-dir", str(tmp_path))
    verify(good, tmp_path)
    with pytest.raises(AssertionError):
        verify(good.replace("Type=notify", "Type=notifyy"), tmp_path)
    with pytest.raises(AssertionError):
        verify(good.replace("ExecStart=", "ExecStart=/nonexistent/swapper ", 1), tmp_path)


def test_service_shape_and_hardening(tmp_path):
    text = unit_text("--models-dir", str(tmp_path), "--drain-timeout", "45s", "--device", "nvidia:0")
    d = directives(text)
    verify(text, tmp_path)
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"] and d["KillMode"] == ["mixed"]
    assert int(d["TimeoutStopSec"][0]) > 45
    assert d["ExecStart"][0].endswith(" serve")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "read-only",
                       "PrivateTmp": "yes", "DevicePolicy": "closed", "DynamicUser": "yes",
                       "StateDirectory": "swapper"}.items():
        assert d[key] == [value], key
    allowed = [a.split()[0] for a in d["DeviceAllow"]]
    assert {"char-nvidiactl", "char-nvidia-uvm", "char-nvidia"} <= set(allowed)
    assert all(a.startswith("char-") for a in allowed), "device groups, never /dev globs"
    assert "modprobe@nvidia-uvm.service" in d["Wants"]
    assert '"SWAPPER_STATE_DIR=/var/lib/swapper"' in d["Environment"], "the StateDirectory= is swapper's state"


def test_device_groups_follow_the_device_setting(tmp_path):
    amd = directives(unit_text("--models-dir", str(tmp_path), "--device", "amd:1"))
    assert sorted(a.split()[0] for a in amd["DeviceAllow"]) == ["char-drm", "char-kfd"]
    assert set(amd["SupplementaryGroups"][0].split()) == {"video", "render"}
    cpu = directives(unit_text("--models-dir", str(tmp_path), "--device", "cpu"))
    assert "DeviceAllow" not in cpu and cpu["DevicePolicy"] == ["closed"]


def test_state_dir_is_the_one_writable_path(tmp_path):
    state = tmp_path / "state dir"
    state.mkdir()
    text = unit_text("--models-dir", str(tmp_path), "--state-dir", str(state), "--user", "root")
    parsed = verify(text, tmp_path)
    assert parsed["ReadWritePaths"] == [str(state)]
    assert parsed_env(parsed)["SWAPPER_STATE_DIR"] == str(state)
    d = directives(text)
    assert d["User"] == ["root"] and "DynamicUser" not in d and "StateDirectory" not in d

    home = directives(unit_text("--models-dir", str(tmp_path), "--user", "root"))
    assert home["ReadWritePaths"] == [str(Path(os.path.expanduser("~root")) / ".cache" / "swapper")]


def test_settings_round_trip_through_systemds_parser(tmp_path):
    """Flags with %, spaces and lists become Environment= lines that give back the same settings."""
    models = tmp_path / "my models"
    models.mkdir()
    keys = tmp_path / "keys.txt"
    keys.write_text("k1\n")
    flags = ["--models-dir", str(models), "--budget", "90%", "--reserve", "1GiB", "--pin", "a", "--pin", "b",
             "--queue-size", "7", "--idle-ttl", "10m", "--drain-timeout", "20s", "--preset", "cpu",
             "--cors-origin", 'https://x.example/%h"q"', "--api-key-file", str(keys)]
    text = unit_text(*flags, env={"SWAPPER_MAX_MODELS": "3"})
    parsed = verify(text, tmp_path)
    env = parsed_env(parsed)
    assert env["SWAPPER_BUDGET"] == "90%"
    assert env["SWAPPER_MAX_MODELS"] == "3", "settings from the environment are kept too"
    assert env["SWAPPER_API_KEY_FILE"] == "/run/credentials/swapper.service/api-keys"
    assert f"LoadCredential=api-keys:{keys}" in text

    from swapper.cli import _parser

    expected = load_settings(_parser().parse_args(["serve", *flags]), env={"SWAPPER_MAX_MODELS": "3"})
    got = load_settings(None, env={k: v for k, v in env.items() if k != "SWAPPER_API_KEY_FILE"})
    for st in (expected, got):
        st.state_dir = st.api_key_file = None  # the unit moves these on purpose
        st.llama_server = None
    assert render_yaml(got) == render_yaml(expected)
    assert got.cors_origins == ['https://x.example/%h"q"'] and got.preset == "cpu"


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    return sock, path


def _recv_until(sock: socket.socket, key: str) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen += sock.recv(4096).decode().splitlines()
        if key in seen:
            return seen
    raise AssertionError(f"{key} never arrived; got {seen}")


@pytest.mark.real
def test_ready_and_stopping_arrive_when_run_as_the_unit_says(tmp_path, llama_server_bin):
    """ExecStart= and Environment= exactly as systemd parsed them, NOTIFY_SOCKET from the test."""
    models = tmp_path / "models"
    models.mkdir()
    port = free_port()
    text = unit_text("--models-dir", str(models), "--host", "127.0.0.1", "--port", str(port),
                     "--state-dir", str(tmp_path), "--drain-timeout", "5s", "--budget", "50%",
                     "--llama-server", llama_server_bin)
    parsed = verify(text, tmp_path)
    command = next(c for c in parsed["Command Line"] if c.endswith(" serve"))
    sock, path = _notify_socket(tmp_path)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **parsed_env(parsed),
           "NOTIFY_SOCKET": path, "SWAPPER_HF_CACHE": "0"}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(shlex.split(command), env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/")
    try:
        ready = _recv_until(sock, "READY=1")
        assert any(ln.startswith("STATUS=") for ln in ready)
        assert rq.get(f"http://127.0.0.1:{port}/health/live", timeout=5).status == 200, \
            "READY=1 comes once the port answers"
        proc.send_signal(signal.SIGTERM)
        _recv_until(sock, "STOPPING=1")
        timeout_stop = int(directives(text)["TimeoutStopSec"][0])
        assert proc.wait(timeout_stop) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sock.close()
        log.close()
