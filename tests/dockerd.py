"""A Docker engine for the image tests, and the client to drive it.

The engine is the one `DOCKER_HOST` names when it is set; otherwise a private `dockerd` (Debian's
`docker.io`) is started here and stopped afterwards. Its data root lives in swapper's cache
(`$SWAPPER_DOCKER_ROOT`, default `~/.cache/swapper/docker`), so base images, layers and the build
cache survive between runs and a rebuild of unchanged sources takes seconds. It touches no host
firewall (`--iptables=false`) and makes no default bridge (`--bridge=none`): builds use the host's
network, containers get a user-defined bridge network with ports published on 127.0.0.1 by
Docker's userland proxy.

Builds go through BuildKit, the only builder that reads `<Dockerfile>.dockerignore`: a client with
the buildx plugin, or a client older than 23.0 (Debian 12's `docker.io`) talking to the daemon's
own BuildKit. A client that would fall back to the legacy builder is refused, because the legacy
builder would silently send the whole working tree as the build context.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

DOCKER_ROOT = Path(os.environ.get("SWAPPER_DOCKER_ROOT", Path.home() / ".cache" / "swapper" / "docker"))


class DockerUnavailable(RuntimeError):
    """No Docker engine can be used here; the message says why and what to install."""


@dataclass
class Docker:
    """The docker CLI bound to one engine."""

    client: str
    env: dict[str, str] = field(default_factory=dict)

    def __call__(self, *args: str, timeout: float = 120, check: bool = True,
                 **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
        out = subprocess.run([self.client, *args], env={**os.environ, **self.env}, capture_output=True,
                             text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {out.returncode}:\n{out.stderr[-4000:]}")
        return out

    def answers(self) -> bool:
        try:
            return self("version", "--format", "{{.Server.Version}}", timeout=10, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False


def buildkit_client() -> tuple[str, dict[str, str]]:
    """A docker CLI whose `docker build` is BuildKit, and the environment it needs for that."""
    candidates = [os.environ.get("DOCKER"), shutil.which("docker"), "/usr/bin/docker"]
    tried = []
    for c in dict.fromkeys(c for c in candidates if c and os.access(c, os.X_OK)):
        if subprocess.run([c, "buildx", "version"], capture_output=True).returncode == 0:
            return c, {"DOCKER_BUILDKIT": "1"}
        v = subprocess.run([c, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
        version = v.stdout.strip()
        tried.append(f"{c} ({version or 'no version'}, no buildx plugin)")
        if version and int(version.split(".")[0]) < 23:
            return c, {"DOCKER_BUILDKIT": "1"}
    raise DockerUnavailable("no docker client that builds with BuildKit: install the buildx plugin or "
                            f"Debian's docker.io (apt-get install docker.io); tried {tried or 'none'}")


@contextmanager
def engine(root: Path = DOCKER_ROOT, start_timeout: float = 90) -> Iterator[Docker]:
    """The engine DOCKER_HOST names, or a private dockerd on `root` for the duration."""
    client, env = buildkit_client()
    if os.environ.get("DOCKER_HOST"):
        docker = Docker(client, env)
        if not docker.answers():
            raise DockerUnavailable(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer")
        yield docker
        return
    dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin")
    if not dockerd:
        raise DockerUnavailable("dockerd not found: apt-get install docker.io (or set DOCKER_HOST)")
    if os.geteuid() != 0:
        raise DockerUnavailable("starting dockerd needs root (or set DOCKER_HOST to a running engine)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DockerUnavailable(f"another run is using {root}") from None
        # the sockets live in a short private folder: unix socket paths are limited to 107 bytes
        run = Path(tempfile.mkdtemp(prefix="swapper-dockerd-"))
        docker = Docker(client, {**env, "DOCKER_HOST": f"unix://{run / 'docker.sock'}"})
        log_path = root / "dockerd.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [dockerd, "--data-root", str(root / "root"), "--exec-root", str(run / "exec"),
                 "--pidfile", str(run / "dockerd.pid"), "--host", docker.env["DOCKER_HOST"],
                 "--iptables=false", "--bridge=none"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + start_timeout
            while not docker.answers():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise DockerUnavailable(f"dockerd did not start (exit {proc.poll()}):\n{tail}")
                time.sleep(0.5)
            yield docker
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            unmount_below(run)
            shutil.rmtree(run, ignore_errors=True)


def unmount_below(folder: Path) -> None:
    """dockerd can leave its network namespace mounted in the exec root after it exits."""
    mounts = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(f"{folder}/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
