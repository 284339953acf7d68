"""The main job against its budget (issue 6): wall time per step and peak memory of the whole process tree.

    python benchmarks/quickstart_budget.py --preset demo --out runs/qs_demo       # target: <= 5 min
    python benchmarks/quickstart_budget.py --out runs/qs_default                  # target: <= 30 min, <= 4 GB
    python benchmarks/quickstart_budget.py --preset smoke --out DIR               # seconds, for CI

Runs ``python -m pipelines.quickstart --fresh --out DIR --preset P --variant V`` as a child process and,
every ``--interval`` seconds, sums the resident memory (RSS) of it and all its descendants (the
``accelerate launch`` ranks and DataLoader workers included). Reports the wall time of each of the six
steps (from the job's ``[k/6]`` lines), the total, and three peaks of the tree's memory: summed RSS
(counts pages shared between processes, such as the torch libraries, once per process, so it overstates
what the machine needs), summed PSS (proportional set size: each shared page split among the processes
sharing it, so the sum is the tree's real footprint; Linux only, else omitted) and the largest RSS of
a single process. Prints a table and one JSON line
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


def tree_memory(proc: psutil.Process) -> tuple[int, int, int | None]:
    """(summed RSS, summed PSS or None, largest RSS) in bytes over ``proc`` and its descendants
    (processes that vanish while being read are skipped)."""
    total = largest = pss = 0
    has_pss = True
    for p in [proc, *proc.children(recursive=True)]:
        try:
            mem = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total, largest = total + mem.rss, max(largest, mem.rss)
        if hasattr(mem, "pss"):
            pss += mem.pss
        else:
            has_pss = False
    return total, (pss if has_pss else None), largest


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the job's output folder (started fresh)")
    p.add_argument("--preset", default="default", choices=["default", "demo", "smoke"])
    p.add_argument("--variant", default="discrete", choices=["discrete", "continuous"])
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)

    cmd = [sys.executable, "-m", "pipelines.quickstart", "--fresh", "--out", str(args.out)]
    cmd += ["--preset", args.preset, "--variant", args.variant]
    log_path = Path(f"{args.out}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    peak = {"sum": 0, "pss": 0, "max": 0}
    marks: list[tuple[str, float]] = []  # (step title, seconds since start)
    start = time.perf_counter()
    with open(log_path, "w", buffering=1) as log:  # line-buffered: the child's stderr shares the file
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the [k/6] lines arrive when printed
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1, env=env)
        proc = psutil.Process(child.pid)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                total, pss, largest = tree_memory(proc)
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
    steps = [{"step": name, "seconds": round(e - b, 1)} for (name, _), b, e in zip(marks, starts, ends)]
    results: dict[str, object] = {
        "bench": "quickstart_budget",
        "preset": args.preset,
        "variant": args.variant,
        "cpu_count": os.cpu_count(),
        "wall_s": round(wall, 1),
        "peak_rss_sum_gib": round(peak["sum"] / 2**30, 2),
        "peak_pss_sum_gib": None if peak["pss"] is None else round(peak["pss"] / 2**30, 2),
        "peak_rss_max_process_gib": round(peak["max"] / 2**30, 2),
        "steps": steps,
    }
    for s in steps:
        print(f"{s['step']:<40}{s['seconds']:>9.1f} s")
    print(f"{'total':<40}{wall:>9.1f} s")
    print(f"peak memory: RSS {results['peak_rss_sum_gib']} GiB summed over processes, PSS "
          f"{results['peak_pss_sum_gib']} GiB summed, RSS {results['peak_rss_max_process_gib']} GiB in the "
          "largest")  # fmt: skip
    emit_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
