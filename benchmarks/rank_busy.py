"""Per-rank busy share of a QCRD training run: does every Ray Train worker do about as much as rank 0?

Runs ``qcrd run --methods qcrd`` (the synthetic default, its own local Ray, a short training through ``--set``) in
its own process and samples, every ``--interval`` seconds, ``/proc/PID/stat`` of each Ray Train worker process
descending from that driver (``RayTrainWorker`` in its command line): CPU seconds (user + system, all threads) and
the time it was seen alive. D's pre-training and round-end refreshes run on every rank (issue 13), so each
worker's CPU seconds should be >= 0.9 of the busiest one's. Which worker is rank 0 is not visible from outside;
the ratio to the busiest bounds the ratio to rank 0 from below.

    python benchmarks/rank_busy.py                                  # 2 rounds of the default
    python benchmarks/rank_busy.py --set train.rounds=1 --set data.synthetic_train_size=200   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu_ticks(stat: str) -> tuple[int, int]:
    """(ppid, utime + stime in ticks) from the text of ``/proc/PID/stat`` (the command may hold spaces and
    parentheses, so fields are counted after the last ')')."""
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])  # fields 4, 14 and 15 of proc(5)


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """Every pid below ``root`` in the ``pid -> ppid`` map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def snapshot() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, CPU ticks, command line) of every process readable now."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid, ticks = stat_cpu_ticks(Path(entry.path, "stat").read_text())
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        out[int(entry.name)] = (ppid, ticks, cmd)
    return out


def shares(workers: dict[int, dict]) -> dict:
    """CPU seconds and busy share (CPU seconds / seconds seen) per worker, and each one's CPU seconds relative to
    the busiest worker's."""
    top = max((w["cpu_s"] for w in workers.values()), default=0.0) or 1.0
    return {str(pid): {**w, "busy_share": w["cpu_s"] / max(w["last"] - w["first"], 1e-9),
                       "vs_busiest": w["cpu_s"] / top}
            for pid, w in sorted(workers.items(), key=lambda kv: -kv[1]["cpu_s"])}


def run(sets: list[str], interval_s: float) -> dict:
    qcrd = Path(sys.executable).with_name("qcrd")
    with tempfile.TemporaryDirectory(prefix="rank-busy-") as tmp:
        cmd = [str(qcrd), "run", "--methods", "qcrd", "--out", str(Path(tmp, "run"))]
        for s in sets:
            cmd += ["--set", s]
        # RAY_ADDRESS=local: a fresh Ray of its own, so its workers descend from this driver
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local"}
        workers: dict[int, dict] = {}
        t0 = time.perf_counter()
        with open(Path(tmp, "run.log"), "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            while proc.poll() is None:
                now, procs = time.perf_counter() - t0, snapshot()
                for pid in descendants(proc.pid, {p: v[0] for p, v in procs.items()}):
                    if "RayTrainWorker" in procs[pid][2]:
                        w = workers.setdefault(pid, {"first": now, "cpu_s": 0.0})
                        w["last"], w["cpu_s"] = now, procs[pid][1] / TICKS
                time.sleep(interval_s)
        if proc.returncode:
            raise SystemExit(f"qcrd run exited {proc.returncode}:\n{Path(tmp, 'run.log').read_text()[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "sets": sets, "workers": shares(workers)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                        help="config overrides (default: train.rounds=2)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    args = parser.parse_args(argv)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    result = run(args.set if args.set is not None else ["train.rounds=2"], args.interval)
    result["load"] = [" ".join(load_before), " ".join(Path("/proc/loadavg").read_text().split()[:3])]
    for pid, w in result["workers"].items():
        print(f"worker pid {pid}: {w['cpu_s']:7.1f} CPU s over {w['last'] - w['first']:6.1f} s seen "
              f"(busy {w['busy_share']:.2f}), {w['vs_busiest']:.2f} of the busiest worker's")
    print(f"run {result['wall_s']:.0f} s, load {result['load'][0]} -> {result['load'][1]}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
