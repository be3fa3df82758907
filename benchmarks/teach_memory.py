"""Driver memory of ``qcrd teach`` as the split grows: teacher shards must stream to storage as they finish, so the
driver's peak RSS stays flat from 1x to 10x the default ``data.synthetic_train_size``.

Each size runs ``qcrd teach`` (synthetic task, synthetic teacher backend, a local output folder) in its own process,
the driver, which starts its own local Ray; this script samples that process's ``/proc/PID/status`` in a thread
(VmRSS every 50 ms, and VmHWM, the kernel's own peak, which catches what sampling misses). Ray's processes (raylet,
object store, teacher actors) are other processes and not counted: the question is what the driver holds.

    python benchmarks/teach_memory.py                 # 1x and 10x of the default size
    python benchmarks/teach_memory.py --scales 1,2    # smoke run

Target: peak RSS at 10x <= 1.05x the one at 1x (a whole-split buffer would grow with the split).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
TARGET = 1.05  # peak RSS at the largest scale / at the smallest


def status_kib(pid: int) -> dict[str, int]:
    """The ``/proc/PID/status`` memory fields in KiB (empty once the process is gone or a zombie)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in FIELDS}


class PeakSampler(threading.Thread):
    """Samples a process's memory fields until it exits, keeping each one's highest value."""

    def __init__(self, pid: int, interval_s: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak = dict.fromkeys(FIELDS, 0)  # each field's own highest sample
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now = status_kib(self.pid)
            if len(now) < len(FIELDS):  # exited
                return
            self.peak = {k: max(self.peak[k], now[k]) for k in FIELDS}
            self.samples += 1
            self.stop.wait(self.interval_s)


def teach(examples: int, out: Path, sets: list[str]) -> dict:
    qcrd = Path(sys.executable).with_name("qcrd")
    cmd = [str(qcrd), "teach", "--task", "synthetic", "--out", str(out),
           "--set", "teacher.backend=synthetic", "--set", f"data.synthetic_train_size={examples}"]
    for s in sets:
        cmd += ["--set", s]
    # RAY_ADDRESS=local: a fresh Ray of its own; a bare init joins whatever Ray this machine last started
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "RAY_ADDRESS": "local"}
    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        sampler = PeakSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    if rc != 0:
        raise SystemExit(f"qcrd teach ({examples} examples) exited {rc}; see {log}:\n{log.read_text()[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    mib = {k: v / 1024 for k, v in sampler.peak.items()}
    return {"examples": examples, "wall_s": time.perf_counter() - t0, "peak_mib": max(mib["VmHWM"], mib["VmRSS"]),
            "anon_mib": mib["RssAnon"], "shmem_mib": mib["RssShmem"], "file_mib": mib["RssFile"],
            "samples": sampler.samples,
            "shards": summary["shards"], "rows": summary.get("examples", examples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="1,10", help="multiples of data.synthetic_train_size, comma-separated")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()

    from qcrd_ray.config import Config

    base = Config().data.synthetic_train_size
    scales = [int(s) for s in args.scales.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="teach-memory-") as tmp:
        for scale in scales:
            results.append({"scale": scale, **teach(base * scale, Path(tmp, f"teacher-{scale}x"), args.set)})
            r = results[-1]
            print(f"{scale:>3}x {r['examples']:>6} examples, {r['shards']:>3} shards: driver peak RSS "
                  f"{r['peak_mib']:7.1f} MiB (peaks: anonymous {r['anon_mib']:.1f}, shared {r['shmem_mib']:.1f}, files "
              f"{r['file_mib']:.1f}; {r['samples']} samples), "
                  f"{r['wall_s']:.1f} s", flush=True)
    first, last = results[0], results[-1]
    ratio = last["peak_mib"] / first["peak_mib"]
    print(f"peak RSS {last['scale']}x / {first['scale']}x: {ratio:.3f} (+{last['peak_mib'] - first['peak_mib']:.1f} MiB "
          f"for {last['examples'] - first['examples']} more examples); target <= {TARGET} -> "
          f"{'met' if ratio <= TARGET else 'MISSED'}")
    print(json.dumps({"ratio": ratio, "runs": results}))


if __name__ == "__main__":
    main()
