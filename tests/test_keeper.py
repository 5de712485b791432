"""The keeper: no engine process, however it forks, outlives swapper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import wait_gone
from swapper.keeper import descendants


def keeper(*cmd: str, grace: float = 2.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "swapper.keeper", "--grace", str(grace), "--", *cmd],
                            start_new_session=True)


def wait_tree(p: subprocess.Popen, n: int, timeout: float = 10) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        kids = descendants(p.pid)
        if len(kids) >= n:
            return kids
        time.sleep(0.02)
    raise AssertionError(f"expected {n} descendants, saw {descendants(p.pid)}")


def test_exit_status_of_the_child_is_the_keepers():
    p = keeper("sh", "-c", "exit 7")
    assert p.wait(10) == 7
    p = keeper("sh", "-c", "kill -9 $$")
    assert p.wait(10) == 128 + 9


def test_sigterm_takes_down_grandchildren_too():
    p = keeper("sh", "-c", "sleep 300 & sleep 300 & wait")
    kids = wait_tree(p, 3)
    p.send_signal(signal.SIGTERM)
    p.wait(10)
    assert wait_gone(kids) == []


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period():
    p = keeper("sh", "-c", "trap '' TERM; sleep 300 & wait; sleep 300", grace=0.5)
    kids = wait_tree(p, 2)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    p.wait(10)
    assert wait_gone(kids) == []
    assert time.monotonic() - t0 < 8


def test_double_forked_daemons_are_reaped_when_the_child_exits(tmp_path):
    # the grandchild leaves the child's session and is re-parented to the keeper (a subreaper),
    # not to PID 1, so the keeper still finds and stops it
    pidfile = tmp_path / "daemon.pid"
    p = keeper("sh", "-c", f"(setsid sleep 300 & echo $! > {pidfile}); sleep 0.5; exit 0")
    assert p.wait(15) == 0
    daemon = int(pidfile.read_text())
    assert wait_gone([daemon], 5) == []


def test_sigkill_of_the_supervisor_stops_the_whole_tree(tmp_path):
    script = tmp_path / "sup.py"
    script.write_text(textwrap.dedent("""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-m", "swapper.keeper", "--grace", "1", "--parent", str(os.getpid()),
                          "--", "sh", "-c", "sleep 301 & sleep 301 & wait"], start_new_session=True)
        print("started", flush=True)
        time.sleep(300)
    """))
    sup = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert sup.stdout.readline().strip() == "started"
    kids = wait_tree(sup, 4)  # keeper, sh, two sleeps
    os.kill(sup.pid, signal.SIGKILL)
    sup.wait(10)
    assert wait_gone(kids) == []


def test_the_keeper_arms_its_prctls_without_ctypes(tmp_path):
    """The keeper calls prctl through ctypes' C half (its Python half costs a quarter of the
    keeper's start-up): with `ctypes` unimportable, an orphaned grandchild still comes back to
    it (PR_SET_CHILD_SUBREAPER)."""
    script = tmp_path / "sub.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        sys.modules["ctypes"] = None  # `import ctypes` fails from here on
        from swapper import keeper
        keeper._prctl(keeper.PR_SET_CHILD_SUBREAPER, 1)
        r, w = os.pipe()
        if os.fork() == 0:
            parent = os.getpid()
            if os.fork() == 0:  # the grandchild: orphaned at once, it reports its new parent
                end = time.monotonic() + 10
                while os.getppid() == parent and time.monotonic() < end:
                    time.sleep(0.005)
                os.write(w, str(os.getppid()).encode())
                os._exit(0)
            os._exit(0)
        os.wait()
        os.close(w)
        print(os.read(r, 32).decode() == str(os.getpid()), flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "True", out.stderr
