"""Entrypoints for `ray job submit --working-dir . -- python -m jobs.<stage> --config C ...`.

Each one is the matching `qcrd` subcommand run inside the job's driver: it joins the cluster through the
RAY_ADDRESS that the job supervisor sets, so the same flags work on a laptop and on a cluster.
On a multi-node cluster, --out (and --model) must be a location every node reaches: a URI (s3://bucket/run) or
a path on a shared mount (/mnt/efs/run). A relative path, the default of `jobs.pipeline` included, is refused
before anything runs: it would land in the job's temporary copy of the working dir and vanish with it.
"""

from __future__ import annotations

import sys


def run_subcommand(name: str) -> None:
    from qcrd_ray.cli import main

    sys.exit(main([name, *sys.argv[1:]]))
