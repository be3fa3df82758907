"""Entrypoints for `ray job submit --working-dir . -- python -m jobs.<stage> --config C ...`.

Each one is the matching `qcrd` subcommand run inside the job's driver: it joins the cluster through the
RAY_ADDRESS that the job supervisor sets, so the same flags work on a laptop and on a cluster.
"""

from __future__ import annotations

import sys


def run_subcommand(name: str) -> None:
    from qcrd_ray.cli import main

    sys.exit(main([name, *sys.argv[1:]]))
