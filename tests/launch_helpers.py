"""Starting real `accelerate launch` runs from tests: free ports, CPU env, a retry on a hung run.

Importable from every test file (``tests/conftest.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

FAULT_LAUNCH = str(Path(__file__).with_name("fault_launch.py"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a CPU run: gloo, one thread per process, no Hub."""
    return {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        RUN_MARKER: uuid.uuid4().hex,  # every process of the run inherits it: see reap_run
        **extra,
    }


RUN_MARKER = "MMGEN_TEST_RUN"


def reap_run(env: dict[str, str]) -> list[int]:
    """SIGKILL every process still carrying ``env``'s run marker; returns their pids.

    A rank that outlives its launcher (the launcher was killed, or exited after another rank died
    mid-collective) is re-parented to init and no longer a descendant of anything the test holds;
    the marker in its environment still names it.
    """
    token = f"{RUN_MARKER}={env[RUN_MARKER]}".encode()
    killed = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        pid = int(environ.parent.name)
        if pid == os.getpid():
            continue
        try:
            if token in environ.read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except (OSError, ProcessLookupError):
            continue
    return killed


def launch_cmd(target: list[str], num_processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``target`` (``["-m", "pkg.mod", ...]`` or ``[script, ...]``) on CPU."""
    dist = ["--multi_gpu"] if num_processes > 1 else []
    return [
        sys.executable, "-m", "accelerate.commands.launch", *dist, "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *target,
    ]  # fmt: skip


def _new_port(cmd: list[str]) -> None:
    cmd[cmd.index("--main_process_port") + 1] = str(free_port())


def run_launch(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion; a run that hangs gets one retry, with a warning in the test report.

    The hangs seen here were a rank deadlocked at exit in gloo's destructor, fixed by
    :func:`tokenizers_mm.distributed.finish_distributed`; the warning keeps any new one visible.
    """
    for attempt in range(2):
        _new_port(cmd)
        try:
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            if attempt:
                raise
            tail = (e.stderr or b"")[-2000:]
            msg = f"launch hung for {timeout}s and is retried: {' '.join(cmd[-6:])}\n{tail!r}"
            warnings.warn(msg, stacklevel=2)
        finally:
            if RUN_MARKER in env:
                reap_run(env)  # ranks left behind by a failed or killed run
    raise AssertionError("unreachable")


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher, its process group and every descendant, as a node failure would, and reap it.

    torch's elastic agent starts each rank in a session of its own, so the launcher's process group
    alone would leave the ranks running (orphaned, waiting on a dead peer); they are found through
    /proc before anything is killed.
    """
    ranks = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    env = getattr(proc, "run_env", None)
    if env is not None and RUN_MARKER in env:
        reap_run(env)


def run_until(
    cmd: list[str], env: dict[str, str], ready: Callable[[], bool], log: Path, timeout: float = 300
) -> subprocess.Popen:
    """Start ``cmd`` in its own process group and poll until ``ready()``; the caller kills or waits.

    Output goes to ``log``. If the run exits first, or ``ready()`` is not reached within ``timeout``
    (a hung rendezvous), it is killed and retried once with a fresh port before failing.
    """
    for attempt in range(2):
        _new_port(cmd)
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc.run_env = env  # for kill_group's reap_run
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return proc
            if proc.poll() is not None:
                raise AssertionError(f"run exited with {proc.returncode} before it was ready:\n{_tail(log)}")
            time.sleep(0.2)
        kill_group(proc)
        if attempt:
            raise AssertionError(f"run not ready after {timeout}s:\n{_tail(log)}")
    raise AssertionError("unreachable")


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:]
