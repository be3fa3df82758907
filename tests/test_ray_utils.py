"""init_ray: the Ray a command starts is usable next to another Ray on the same machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# A driver in its own process (one process holds one Ray): starts its Ray the way every qcrd command does, then
# asks Ray's state API, from inside a worker and without an address, about an actor of its own cluster. This is
# what Ray Train's placement-group cleaner does every second to see whether the training controller is alive.
PROBE = textwrap.dedent("""
    import ray
    from qcrd_ray.ray_utils import init_ray

    init_ray(num_cpus=1)

    @ray.remote(num_cpus=0)
    class Alive:
        def ping(self):
            return True

    @ray.remote(num_cpus=0)
    def state_of(actor_id):
        from ray.util.state import get_actor
        actor = get_actor(actor_id, timeout=30)
        return actor.state if actor else "not found"

    alive = Alive.remote()
    ray.get(alive.ping.remote())
    print("STATE", ray.get(state_of.remote(alive._actor_id.hex())))
""")


@pytest.mark.ray
def test_workers_query_their_own_cluster_with_another_ray_on_the_machine(ray_session, tmp_path):
    """Before: with the test session's Ray also running, the worker's state API call failed ("Found multiple
    active Ray instances") or, with a `ray start` cluster on the machine, asked that cluster, did not find the
    controller and Ray Train removed the live run's placement group ("Destroying worker since its placement
    group was removed")."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STATE ALIVE" in proc.stdout, proc.stdout + proc.stderr[-3000:]
