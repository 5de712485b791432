"""The keeper: a tiny parent for each child server, so that no engine process outlives swapper.

A parent-death signal set on the child alone does not reach its grandchildren (vLLM's engine
core and workers, for one), and nothing at all reaches them when swapper is SIGKILLed. So every
child runs under a keeper that:
- asks the kernel for SIGTERM when swapper dies (PR_SET_PDEATHSIG), and exits at once if
  swapper is already gone;
- becomes a child subreaper (PR_SET_CHILD_SUBREAPER), so descendants that double-fork or lose
  their parent are re-parented to it, not to PID 1, and stay findable;
- on SIGTERM/SIGINT/SIGHUP forwards SIGTERM to the child's process group, and after the grace
  period SIGKILLs every descendant that is left;
- when the child exits on its own, cleans up its leftovers the same way and exits with the
  child's status (128 + signal when killed), which swapper reports as the exit code.

    python -m swapper.keeper --grace SECONDS --parent PID -- COMMAND ARGS...

Kept to the standard library and a few milliseconds of start-up (it is on every swap's path:
`_signal`, not `signal`, whose enums cost a third of it; no interpreter teardown at exit).
"""

from __future__ import annotations

import os
import _signal as signal  # the C module: `signal` imports enum, a third of the start-up
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, arg: int) -> None:
    """libc's prctl, through `_ctypes`, the C half of ctypes: importing ctypes itself (its Python
    half) took 3.5 ms, a quarter of the keeper's start-up, which every swap waits for. ctypes
    where the C half's calls are missing."""
    try:
        import _ctypes

        _ctypes.call_function(_ctypes.dlsym(_ctypes.dlopen(None), "prctl"), (option, arg, 0, 0, 0))
        return
    except (ImportError, OSError, AttributeError):
        pass
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (ImportError, OSError, AttributeError):
        pass


def descendants(root: int) -> list[int]:
    """PIDs below `root`, read from /proc (children before grandchildren)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the ppid follows the last ')'
        rest = stat[stat.rfind(b")") + 2:].split()
        if len(rest) < 2:
            continue
        children.setdefault(int(rest[1]), []).append(int(name))
    out: list[int] = []
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


_main: dict[str, int] = {}  # pid and wait status of the main child, once reaped


def _reap() -> bool:
    """Reap every exited descendant, remembering the main child's status; whether any are left.

    The keeper is a subreaper, so every descendant still running is below one of its children
    (a process whose parent dies is re-parented to it): with no child left to wait for, none
    is left at all, and no /proc scan is needed to know it.
    """
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        if pid == _main.get("pid"):
            _main["status"] = st


def _terminate_tree(child_pgid: int, grace: float) -> None:
    """SIGTERM the child's group and every descendant, then SIGKILL what is left."""
    me = os.getpid()
    try:
        os.killpg(child_pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    _signal_all(descendants(me), signal.SIGTERM)  # those that left the group
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _reap():
            return
        # woken by the next child exit (SIGCHLD is blocked, so it waits here) or after 50 ms
        signal.sigtimedwait({signal.SIGCHLD}, 0.05)
    _signal_all(descendants(me), signal.SIGKILL)
    try:
        os.killpg(child_pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    end = time.monotonic() + 5
    while _reap() and time.monotonic() < end:
        signal.sigtimedwait({signal.SIGCHLD}, 0.02)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    grace, parent = 10.0, 0
    while argv and argv[0] != "--":
        opt = argv.pop(0)
        if opt == "--grace":
            grace = float(argv.pop(0))
        elif opt == "--parent":
            parent = int(argv.pop(0))
        else:
            print(f"keeper: unknown option {opt}", file=sys.stderr)
            return 2
    try:
        # a process group of its own, for swapper's killpg, in swapper's session (see process.py)
        os.setpgid(0, 0)
    except OSError:
        pass
    if not argv or argv[0] != "--" or len(argv) < 2:
        print("usage: python -m swapper.keeper [--grace S] [--parent PID] -- COMMAND ...", file=sys.stderr)
        return 2
    cmd = argv[1:]

    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if parent and os.getppid() != parent:
        return 143  # swapper died before the death signal was armed

    watched = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)

    pid = os.fork()
    if pid == 0:  # the child: its own process group, default signal mask and handlers
        try:
            os.setpgid(0, 0)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
            os.execvp(cmd[0], cmd)
        except OSError as e:
            os.write(2, f"keeper: cannot run {cmd[0]}: {e.strerror}\n".encode())
        os._exit(127)
    _main["pid"] = pid
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass

    while "status" not in _main:
        info = signal.sigwaitinfo(watched)
        if info.si_signo != signal.SIGCHLD:
            _terminate_tree(pid, grace)
            return _exit_code(_main["status"]) if "status" in _main else 128 + info.si_signo
        _reap()
    # the child is gone on its own: take down anything it left behind
    if _reap():
        _terminate_tree(pid, min(grace, 5.0))
    return _exit_code(_main["status"])


def _exit_code(status: int) -> int:
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 1


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # nothing to tear down: the interpreter's own finalisation costs a swap ~2 ms
