"""The main job against its budget (issue 6): wall time per step and peak memory of the whole process tree.

    python benchmarks/quickstart_budget.py --preset demo --out runs/qs_demo       # target: <= 5 min
    python benchmarks/quickstart_budget.py --out runs/qs_default                  # target: <= 30 min, <= 4 GB
    python benchmarks/quickstart_budget.py --preset smoke --out DIR               # seconds, for CI

Runs ``python -m pipelines.quickstart --fresh --out DIR --preset P --variant V [ARGS]`` as a child process
(any further arguments go to the job, e.g. ``--decoder_steps 200``) and,
every ``--interval`` seconds, sums the resident memory (RSS) of it and all its descendants (the
``accelerate launch`` ranks and DataLoader workers included). Reports the wall time of each of the six
steps (from the job's ``[k/6]`` lines), the total, and three peaks of the tree's memory: summed RSS
(counts pages shared between processes, such as the torch libraries, once per process, so it overstates
what the machine needs), summed PSS (proportional set size: each shared page split among the processes
sharing it, so the sum is the tree's real footprint; Linux only, else omitted) and the largest RSS of
a single process; also each step's own peak (summed PSS) and the tree's processes at the run's peak
(so a peak can be traced to the decoder ranks or to the job's own process). Prints a table and one JSON line
``{"bench": "quickstart_budget", ...}``; the job's own output goes to ``DIR.log``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from bench_common import emit_json

STEP = re.compile(r"^\[(\d)/6\] (.*)")


def _gib(n: int) -> float:
    """Bytes as GiB, to two decimals."""
    return round(n / 2**30, 2)


def _label(p: psutil.Process) -> str:
    """A process's executable and module (``python -m ar_model.train``), else its first two arguments."""
    try:
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not cmd:
        return p.name()
    if len(cmd) > 2 and cmd[1] == "-c" and "multiprocessing" in cmd[2]:  # the job's spawned step process
        return f"{Path(cmd[0]).name} ({'resource tracker' if 'resource_tracker' in cmd[2] else 'job step'})"
    args = cmd[cmd.index("-m") : cmd.index("-m") + 2] if "-m" in cmd[:-1] else cmd[1:3]
    return " ".join([Path(cmd[0]).name, *args])[:60]


def tree_processes(proc: psutil.Process) -> list[tuple[str, int, int | None]]:
    """``(label, RSS, PSS or None)`` in bytes for ``proc`` and each of its descendants (processes that vanish
    while being read are skipped)."""
    rows = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            mem = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rows.append((_label(p), mem.rss, getattr(mem, "pss", None)))
    return rows


def tree_memory_of(rows: list[tuple[str, int, int | None]]) -> tuple[int, int | None, int]:
    """(summed RSS, summed PSS or None, largest RSS) of :func:`tree_processes` rows."""
    pss = None if any(r[2] is None for r in rows) else sum(r[2] for r in rows)
    return sum(r[1] for r in rows), pss, max((r[1] for r in rows), default=0)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the job's output folder (started fresh)")
    p.add_argument("--preset", default="default", choices=["default", "demo", "smoke"])
    p.add_argument("--variant", default="discrete", choices=["discrete", "continuous"])
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON result to this file")
    args, job_args = p.parse_known_args(argv)  # the rest goes to the job (--decoder_steps N, tokenizer keys)

    cmd = [sys.executable, "-m", "pipelines.quickstart", "--fresh", "--out", str(args.out)]
    cmd += ["--preset", args.preset, "--variant", args.variant, *job_args]
    log_path = Path(f"{args.out}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    peak = {"sum": 0, "pss": 0, "max": 0}
    step_peak: dict[int, int] = {}  # step index (0 = step 1) -> its peak of summed PSS (RSS without PSS)
    at_peak: list[tuple[str, int, int | None]] = []  # the tree's processes when summed memory peaked
    marks: list[tuple[str, float]] = []  # (step title, seconds since start)
    start = time.perf_counter()
    with open(log_path, "w", buffering=1) as log:  # line-buffered: the child's stderr shares the file
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the [k/6] lines arrive when printed
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1, env=env)
        proc = psutil.Process(child.pid)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                rows = tree_processes(proc)
                total, pss, largest = tree_memory_of(rows)
                step = max(len(marks) - 1, 0)
                footprint = total if pss is None else pss
                if footprint > max(step_peak.values(), default=0):
                    at_peak[:] = rows
                step_peak[step] = max(step_peak.get(step, 0), footprint)
                peak["sum"], peak["max"] = max(peak["sum"], total), max(peak["max"], largest)
                peak["pss"] = None if pss is None or peak["pss"] is None else max(peak["pss"], pss)
                stop.wait(args.interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for line in child.stdout:
            log.write(line)
            if m := STEP.match(line):
                marks.append((f"{m.group(1)}. {m.group(2).split(' → ')[0]}", time.perf_counter() - start))
        returncode = child.wait()
        stop.set()
        sampler.join()
    wall = time.perf_counter() - start
    if returncode != 0:
        raise SystemExit(f"the main job failed (exit {returncode}); see {log_path}")
    starts = [0.0] + [t for _, t in marks[1:]]  # step 1 includes the job's start-up (imports)
    ends = starts[1:] + [wall]
    steps = [
        {"step": name, "seconds": round(e - b, 1), "peak_gib": _gib(step_peak.get(i, 0))}
        for i, ((name, _), b, e) in enumerate(zip(marks, starts, ends))
    ]
    results: dict[str, object] = {
        "bench": "quickstart_budget",
        "preset": args.preset,
        "variant": args.variant,
        "job_args": job_args,
        "cpu_count": os.cpu_count(),
        "wall_s": round(wall, 1),
        "peak_rss_sum_gib": _gib(peak["sum"]),
        "peak_pss_sum_gib": None if peak["pss"] is None else _gib(peak["pss"]),
        "peak_rss_max_process_gib": _gib(peak["max"]),
        "steps": steps,
        "processes_at_peak": [
            {
                "process": label,
                "rss_gib": _gib(rss),
                "pss_gib": None if p is None else _gib(p),
            }
            for label, rss, p in sorted(at_peak, key=lambda r: -(r[2] if r[2] is not None else r[1]))
        ],
    }
    for s in steps:
        print(f"{s['step']:<40}{s['seconds']:>9.1f} s   peak {s['peak_gib']:.2f} GiB")
    print(f"{'total':<40}{wall:>9.1f} s")
    print(f"peak memory: RSS {results['peak_rss_sum_gib']} GiB summed over processes, PSS "
          f"{results['peak_pss_sum_gib']} GiB summed, RSS {results['peak_rss_max_process_gib']} GiB in the "
          "largest")  # fmt: skip
    emit_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
