"""The container images, built by a real Docker engine and run the way a user runs them.

The base is made here without any registry (`images/local-base.sh`: debootstrap of the Debian
release the images use, Debian's Python, this host's CA certificates) and passed as the build
argument the Dockerfiles take, so the Dockerfiles build unchanged; `SWAPPER_IMAGES_BASE` names
another base (e.g. `python:3.12-slim-bookworm` where Docker Hub is reachable). Selected only with
`-m images` (`make test-images`): a first build compiles llama-server (minutes); later runs reuse
the engine's cache under `~/.cache/swapper/docker`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
import urllib.request
from importlib.metadata import version
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from openai import OpenAI

from conftest import REPO
from dockerd import DOCKER_ROOT, Docker, engine
from swapper.process import free_port

pytestmark = pytest.mark.images

VERSION = version("swapper")
UID = "10001"
NETWORK = "swapper-images-test"


def report(request: pytest.FixtureRequest, line: str) -> None:
    """Build times and sizes go to the terminal even when output is captured."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter and capture:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[images] {line}")


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    with engine() as d:
        d("network", "create", NETWORK, check=False)
        try:
            yield d
        finally:
            d("network", "rm", NETWORK, check=False)
            d("image", "prune", "-f", check=False)  # images a rebuild untagged: the cache stays bounded


def local_base_tag() -> str:
    """Named by the script's code, so a changed script makes a new base (comments do not)."""
    code = "".join(ln for ln in (REPO / "images" / "local-base.sh").read_text().splitlines(True)
                   if not ln.lstrip().startswith("#"))
    return f"swapper-base:bookworm-{hashlib.sha256(code.encode()).hexdigest()[:12]}"


@pytest.fixture(scope="module")
def base(docker: Docker, request: pytest.FixtureRequest) -> str:
    if os.environ.get("SWAPPER_IMAGES_BASE"):
        return os.environ["SWAPPER_IMAGES_BASE"]
    tag = local_base_tag()
    t0 = time.monotonic()
    out = subprocess.run([str(REPO / "images" / "local-base.sh"), tag], capture_output=True, text=True,
                         env={**os.environ, **docker.env, "DOCKER": docker.client}, timeout=900)
    assert out.returncode == 0, f"images/local-base.sh failed:\n{out.stderr[-4000:]}"
    report(request, f"local base: {out.stdout.strip().splitlines()[-1]} ({time.monotonic() - t0:.0f} s)")
    older = docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}", tag.split(":")[0]).stdout.split()
    for stale in set(older) - {tag}:
        docker("image", "rm", stale, check=False)
    return tag


@dataclass
class Built:
    tag: str
    seconds: float
    size: int


def build(docker: Docker, request: pytest.FixtureRequest, name: str, args: dict[str, str]) -> Built:
    tag = f"swapper:{VERSION}-{name}"
    log = DOCKER_ROOT / f"build-{name}.log"
    flags = [a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")]
    t0 = time.monotonic()
    out = docker("build", "--network", "host", "--progress", "plain", *flags, "-f", f"images/{name}/Dockerfile",
                 "-t", tag, ".", cwd=REPO, timeout=3600, check=False)
    seconds = time.monotonic() - t0
    log.write_text(out.stdout + out.stderr)
    assert out.returncode == 0, f"docker build {name} failed (log: {log}):\n{out.stderr[-6000:]}"
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    report(request, f"{tag}: built in {seconds:.0f} s, {size / 1e6:.0f} MB (log: {log})")
    return Built(tag, seconds, size)


@pytest.fixture(scope="module")
def cpu_image(docker: Docker, base: str, request: pytest.FixtureRequest) -> Built:
    return build(docker, request, "cpu", {"PYTHON_IMAGE": base})


# ------------------------------------------------------------------------------ the local base


def test_local_base_is_the_images_debian_with_python_and_the_hosts_ca_certificates(docker, base):
    if os.environ.get("SWAPPER_IMAGES_BASE"):
        pytest.skip("a base named by SWAPPER_IMAGES_BASE is not made here")
    out = docker("run", "--rm", "--network", "none", base, "sh", "-c",
                 "cat /etc/debian_version; python3 -c 'import ensurepip, ssl, venv; print(ssl.OPENSSL_VERSION)';"
                 " python3 -m pip --version; cat /etc/ssl/certs/ca-certificates.crt").stdout
    assert out.split("\n", 1)[0].startswith("12."), "bookworm, the release of python:3.12-slim-bookworm"
    assert "OpenSSL" in out and "pip " in out
    bundle = "".join(out.split())
    host_certs = sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    for cert in host_certs:
        body = cert.read_text().split("-----BEGIN CERTIFICATE-----")[1].split("-----END")[0]
        assert "".join(body.split()) in bundle, f"{cert} is not trusted inside the base"


# ------------------------------------------------------------------------------ the cpu image


def test_cpu_image_holds_a_working_llama_server_and_runs_unprivileged(docker, cpu_image):
    config = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", cpu_image.tag).stdout)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["swapper", "serve"] and config["StopSignal"] == "SIGTERM"
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", cpu_image.tag, "-c",
                 "id -u; llama-server --version 2>&1; swapper --help >/dev/null && echo swapper-ok;"
                 " test -w /home/swapper/.cache/swapper && echo state-writable;"
                 " python -c 'from swapper import pumping; print(\"pump\", pumping.AVAILABLE)';"
                 " command -v cmake c++ gcc cc || echo no-compilers").stdout.split("\n")
    assert out[0] == UID
    assert any(ln.startswith("version:") for ln in out), out
    assert {"swapper-ok", "state-writable", "no-compilers"} <= set(out), "build tools stay in the build stages"
    assert "pump True" in out, "streams are relayed by swapper/_pump.c, compiled in the venv stage"


@dataclass
class Running:
    name: str
    url: str
    model: str


@pytest.fixture(scope="module")
def served(docker: Docker, cpu_image: Built, tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[Running]:
    """`docker run -p ... -v models:/models:ro swapper:VERSION-cpu`, as images/README.md shows."""
    models = tmp_path_factory.mktemp("models")
    from swapper.synth import write_model

    write_model(models / "tiny.gguf", 16 << 20, seed=5, ctx=4096)  # swapper's default ctx_size
    models.chmod(0o755)  # the container's user reads the mounted folder
    (models / "tiny.gguf").chmod(0o644)
    port, name = free_port(), f"swapper-cpu-test-{os.getpid()}"
    docker("rm", "-f", name, check=False)
    t0 = time.monotonic()
    docker("run", "-d", "--name", name, "--network", NETWORK, "-p", f"127.0.0.1:{port}:8080",
           "--stop-timeout", "40", "-v", f"{models}:/models:ro", cpu_image.tag)
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: http_status(f"{url}/health/live") == 200, 60, "/health/live", docker, name)
        report(request, f"{cpu_image.tag}: /health/live answered {time.monotonic() - t0:.1f} s after docker run")
        yield Running(name, url, "tiny")
    finally:
        docker("rm", "-f", name, check=False)


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except Exception:  # noqa: BLE001 - not up yet: connection refused, reset, or an error status
        return None


def wait(pred, timeout: float, what: str, docker: Docker | None = None, name: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            logs = docker("logs", "--tail", "60", name, check=False) if docker else None
            raise AssertionError(f"{what}: not within {timeout} s\n{logs.stdout + logs.stderr if logs else ''}")
        time.sleep(0.5)


def test_cpu_container_serves_a_chat_completion_from_the_mounted_models(served):
    client = OpenAI(base_url=f"{served.url}/v1", api_key="none", timeout=120)
    assert [m.id for m in client.models.list().data] == [served.model]
    reply = client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert reply.model == served.model and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 8


def container_processes(docker: Docker, name: str) -> list[tuple[str, int, str]]:
    """(uid, host pid, command) of every process in the container, as the host sees them."""
    rows = docker("top", name, "-eo", "uid,pid,comm").stdout.splitlines()[1:]
    return [(r.split()[0], int(r.split()[1]), r.split(None, 2)[2]) for r in rows]


def test_every_process_in_the_cpu_container_runs_as_the_unprivileged_user(docker, served):
    client = OpenAI(base_url=f"{served.url}/v1", api_key="none", timeout=120)
    client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    procs = container_processes(docker, served.name)
    assert {cmd for _, _, cmd in procs} >= {"swapper", "llama-server"}, procs
    assert {uid for uid, _, _ in procs} == {UID}, procs


def test_cpu_container_healthcheck_reaches_healthy(docker, served):
    def status() -> str:
        return docker("inspect", "-f", "{{.State.Health.Status}}", served.name).stdout.strip()

    # the image's own schedule: first probe after the 30 s interval
    wait(lambda: status() == "healthy", 120, "HEALTHCHECK healthy", docker, served.name)
    health = json.loads(docker("inspect", "-f", "{{json .State.Health}}", served.name).stdout)
    assert health["FailingStreak"] == 0 and health["Log"][-1]["ExitCode"] == 0


def test_docker_stop_drains_the_in_flight_stream_exits_zero_and_leaves_no_process(docker, served, request):
    client = OpenAI(base_url=f"{served.url}/v1", api_key="none", timeout=120)
    t0 = time.monotonic()
    client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "Go"}],
                                   max_tokens=64, extra_body={"ignore_eos": True})
    per_token = (time.monotonic() - t0) / 64
    # about 5 s of generation: in flight when SIGTERM comes, done well inside the 30 s drain (on a
    # fast box more than 1800 tokens: those took 2.3 s here, once less than `docker stop` did)
    tokens = max(64, min(3800, int(5.0 / per_token)))
    pids = [pid for _, pid, _ in container_processes(docker, served.name)]
    assert len(pids) >= 2
    stream = client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "Go"}],
                                            max_tokens=tokens, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    stopped: dict[str, float] = {}

    def stop() -> None:
        s0 = time.monotonic()
        docker("stop", served.name, timeout=90)
        stopped["seconds"] = time.monotonic() - s0

    stopper = threading.Thread(target=stop)
    stopper.start()
    rest = list(chunks)
    stopper.join(timeout=90)
    finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"], "the stream in flight at SIGTERM ran to its end"
    out = docker("logs", served.name)
    logs = (out.stderr if "shutting down" in out.stderr else out.stdout).splitlines()  # swapper's log stream
    draining = next(n for n, ln in enumerate(logs) if "shutting down: draining" in ln)
    answered = max(n for n, ln in enumerate(logs) if "POST /v1/chat/completions 200" in ln)
    assert draining < answered, "the stream was still in flight when SIGTERM came, and was answered"
    state = json.loads(docker("inspect", "-f", "{{json .State}}", served.name).stdout)
    assert state["Status"] == "exited" and state["ExitCode"] == 0 and not state["OOMKilled"]
    assert stopped["seconds"] < 40, "stopped within the stop timeout, not killed at its end"
    report(request, f"docker stop: exit 0 after {stopped['seconds']:.2f} s, a {tokens}-token stream drained")
    assert not [p for p in pids if running(p)], "processes left after stop"


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

