"""Starting or joining a Ray cluster the same way from every entrypoint, with Ray's output where it belongs."""

from __future__ import annotations

import logging
import os

from qcrd_ray import console

# Ray's driver-side loggers that print through their own console handlers (propagate off).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
# Progress bars of libraries on the workers: their output goes to RUN/logs/workers.log, where a bar is noise.
QUIET_WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
# Run first in every worker of a Ray we start or join (runtime_env's worker_process_setup_hook); see pin_ray_address.
SETUP_HOOK = "qcrd_ray.ray_utils.pin_ray_address"
_PRINT_HANDLER = "ray_print_logs"  # the name ray.init gives its handler that prints worker output on the driver
_LOG_HANDLER = "qcrd_worker_logs"
# The raylet's notice that it started more Python workers than the node has cores: expected whenever actors and
# train workers ask for fractional CPUs (our default on small machines), and nothing a user can act on. Other
# raylet messages (a worker killed for memory) still reach the console.
_EXPECTED_RAYLET_NOTICES = ("PYTHON worker processes have been started",)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``, as set by ``ray job submit``), else start a local Ray.

    Idempotent: a process that is already connected keeps its connection. Either way, unless the command runs
    with ``--verbose``, workers' output goes to the ``console.WORKER_LOGGER`` log (RUN/logs/workers.log) instead
    of the console, and Ray's own progress bars and INFO lines stay off the console.
    """
    import ray

    quiet = not console.is_verbose()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            check_reachable(address)
        # A local Ray gets its dashboard (http://127.0.0.1:8265): users watch the run there, and Ray Train's
        # placement-group cleaner polls the state API it serves. "local" explicitly: a bare ray.init() would join
        # whatever cluster the last `ray start` on this machine recorded, and wait on it forever if it has died.
        kwargs = {"address": address} if address else {"address": "local", "num_cpus": num_cpus}
        # Variables the job's own runtime_env already sets are left out: Ray refuses to merge a conflict.
        env = {k: v for k, v in QUIET_WORKER_ENV.items() if k not in os.environ}
        kwargs["runtime_env"] = worker_runtime_env(env if quiet else {})
        # log_to_driver stays on: the driver receives every node's worker output and routes it (below).
        ray.init(log_to_driver=True, configure_logging=False, **kwargs)
    _route_ray_output(quiet)


class ClusterUnreachable(ConnectionError):
    """A Ray cluster address that does not answer."""


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, within ``timeout_s``, a ``host:port`` cluster address nothing listens on (Ray itself would retry
    for minutes without a word). ``auto``, ``local`` and ``ray://`` addresses are left to Ray."""
    import socket

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as e:
        raise ClusterUnreachable(f"no Ray cluster answers at {address} ({e}); start it (`ray start --head`), fix "
                                 "--address / RAY_ADDRESS, or leave both unset to start a local Ray") from None


def worker_runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    """The runtime_env every Ray of ours is started or joined with: workers pin their own cluster's address."""
    runtime_env: dict = {"worker_process_setup_hook": SETUP_HOOK}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def pin_ray_address() -> None:
    """Point ``RAY_ADDRESS`` of this worker at the cluster it belongs to.

    Code in a worker that calls Ray's state API without an address (Ray Train's placement-group cleaner polls it
    to see whether its controller is alive) finds "the" cluster by RAY_ADDRESS, else the newest ``ray start``
    cluster on the machine, else fails when several Ray instances run there. With a second Ray on the machine
    (a laptop's ``ray start``, a test's head) the cleaner asked the other cluster, did not find its controller,
    and removed the placement group of a live training run, killing its workers."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def _route_ray_output(quiet: bool) -> None:
    import ray.data
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    dispatcher.remove_handler(_LOG_HANDLER)  # add_handler appends: once per process
    dispatcher.add_handler(_LOG_HANDLER, _log_worker_lines)
    if quiet:
        dispatcher.remove_handler(_PRINT_HANDLER)
    _route_raylet_messages(ray_worker, quiet)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.enable_operator_progress_bars = not quiet
    for handler in logging.getLogger("ray.data").handlers:
        handler.addFilter(_not_bars_notice)
    console.adopt_library_loggers(RAY_LOGGERS)


def _not_bars_notice(record: logging.LogRecord) -> bool:
    """Ray Data's warning that its bars are off, which we just did on purpose."""
    return not record.getMessage().startswith("Progress bars disabled")


def _route_raylet_messages(ray_worker, quiet: bool) -> None:
    """Raylet messages reach the driver through ``print_to_stdstream`` (not the dispatcher above): each goes to
    the workers log, and to the console unless quiet and it is an expected notice."""
    print_original = getattr(ray_worker.print_to_stdstream, "__wrapped__", ray_worker.print_to_stdstream)

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            _log_worker_lines(data)
            if quiet and any(n in line for line in data.get("lines", []) for n in _EXPECTED_RAYLET_NOTICES):
                return
        print_original(data, ignore_prefix)

    print_to_stdstream.__wrapped__ = print_original
    ray_worker.print_to_stdstream = print_to_stdstream


_workers_log = logging.getLogger(console.WORKER_LOGGER)
_autoscaler_in_status = False


def _autoscaler_status(line: str) -> bool:
    """Whether an autoscaler line belongs to its periodic status report: the same ~25-line table every 5 s,
    which buried everything else in the workers log. Its other lines (nodes launched or lost) are kept; the
    status is a line away with ``ray status``."""
    global _autoscaler_in_status
    if line.rstrip().endswith(" --"):  # the empty log record that opens the report
        return True
    if "Autoscaler status:" in line:
        _autoscaler_in_status = True
    elif "The autoscaler took" in line:
        _autoscaler_in_status = "complete the update iteration" not in line and _autoscaler_in_status
        return True
    return _autoscaler_in_status


def _log_worker_lines(data: dict) -> None:
    """One batch of a worker's stdout/stderr lines (Ray's log monitor format) → the workers log, prefixed
    like Ray prints them: ``(RayTrainWorker pid=123, ip=10.0.0.2) <line>``."""
    if data.get("pid") == "raylet":  # the raylet's own messages carry no actor, task or ip
        who = "(raylet)"
    else:
        who = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')}, ip={data.get('ip')})"
    stream = "err" if data.get("is_err") else "out"
    for line in data.get("lines", []):
        if data.get("pid") == "autoscaler" and _autoscaler_status(line):
            continue
        _workers_log.info("%s %s: %s", who, stream, line)
        if line.startswith(console.NOTICE_TAG):  # a recovery the user must see (console.notice)
            console.summary(line[len(console.NOTICE_TAG):] + f" [ip {data.get('ip')}]")
