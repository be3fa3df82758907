"""Starting or joining a Ray cluster the same way from every entrypoint."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``, as set by ``ray job submit``), else start a local Ray.

    Idempotent: a process that is already connected keeps its connection.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    # A local Ray gets its dashboard (http://127.0.0.1:8265): users watch the run there, and Ray Train's
    # placement-group cleaner polls the state API it serves.
    kwargs = {"address": address} if address else {"num_cpus": num_cpus}
    ray.init(log_to_driver=True, configure_logging=False, **kwargs)
