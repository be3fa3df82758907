"""Submit, follow, inspect and stop qcrd jobs on a Ray cluster (a thin layer over JobSubmissionClient).

    python -m jobs.submit submit [--address URL] -- python -m jobs.pipeline --config C --out s3://bucket/runs/x
    python -m jobs.submit logs JOB_ID [--follow]
    python -m jobs.submit status JOB_ID
    python -m jobs.submit stop JOB_ID

`submit` ships this directory as the job's working dir, follows the logs until the job ends (unless
--no-follow) and exits 0 only if the job SUCCEEDED, so it can gate a shell script or CI.

A cluster started from cluster.yaml requires Ray's token: every request carries it (``auth_token``), so this
works whatever RAY_AUTH_MODE says on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Mapping

# Never shipped with the working dir: local environments, run outputs, VCS metadata.
WORKING_DIR_EXCLUDES = [".venv/", ".git/", "runs/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120.0  # how long a submission waits for a freshly started head's job agent


class TokenError(ValueError):
    """The token file named by RAY_AUTH_TOKEN_PATH cannot be used."""


def auth_token(env: Mapping[str, str] = os.environ, home: Path | None = None) -> str | None:
    """The cluster's token, looked up where Ray looks: ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``,
    then ``~/.ray/auth_token`` (what ``ray get-auth-token --generate`` writes); None when there is none."""
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise TokenError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({e})") from e
        if not token:  # as Ray does: a named token file that is empty is a mistake, not "no token"
            raise TokenError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token
    default = (home or Path.home()) / ".ray" / "auth_token"
    return (default.read_text().strip() or None) if default.is_file() else None


def auth_headers(token: str | None) -> dict[str, str]:
    # a cluster without token auth ignores the header, so it is always sent when there is a token
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers(auth_token()))


def submit(address: str, entrypoint: list[str], working_dir: str = ".", job_id: str | None = None,
           env: dict[str, str] | None = None) -> str:
    """Submit ``entrypoint`` with ``working_dir`` shipped to the cluster; returns the job id."""
    runtime_env = {"working_dir": str(Path(working_dir).resolve()), "excludes": WORKING_DIR_EXCLUDES}
    if env:
        runtime_env["env_vars"] = env
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return _client(address).submit_job(
                entrypoint=" ".join(entrypoint), runtime_env=runtime_env, submission_id=job_id)
        except (ConnectionError, RuntimeError) as e:
            # A head that has just started (`ray start`, `ray up`) refuses or answers "No available agent" until
            # its dashboard and job agent are up.
            starting = isinstance(e, ConnectionError) or "No available agent" in str(e)
            if not starting or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def follow(address: str, job_id: str, out=None) -> str:
    """Stream the job's logs until it ends (to ``out``, default the current stdout); returns its final status."""
    client, out = _client(address), out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return wait(address, job_id)


def wait(address: str, job_id: str, timeout_s: float = float("inf"), poll_s: float = 1.0) -> str:
    client = _client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                        help="the cluster's job server (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="<action>")
    p = sub.add_parser("submit", help="submit an entrypoint (after --) and follow it to the end")
    p.add_argument("--working-dir", default=".", help="directory shipped to the cluster (default: .)")
    p.add_argument("--job-id", help="submission id (default: generated)")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return at once")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- python -m jobs.pipeline --config ...")
    for name, purpose in (("logs", "print a job's logs"), ("status", "print a job's status"),
                          ("stop", "stop a running job")):
        q = sub.add_parser(name, help=purpose)
        q.add_argument("job_id")
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    args = parser.parse_args(argv)
    from ray.exceptions import AuthenticationError

    try:
        return _run(args, parser)
    except (AuthenticationError, TokenError) as e:
        print(f"error: {args.address}: {e}\nThe token is read from $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH "
              "or ~/.ray/auth_token; the cluster's own is printed by `ray get-auth-token` on its head.",
              file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.action == "submit":
        entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
        if not entrypoint:
            parser.error("submit needs an entrypoint after --, e.g. -- python -m jobs.pipeline")
        job_id = submit(args.address, entrypoint, args.working_dir, args.job_id)
        print(f"submitted {job_id} to {args.address}", file=sys.stderr)
        if args.no_follow:
            print(job_id)
            return 0
        status = follow(args.address, job_id)
        print(f"job {job_id}: {status}", file=sys.stderr)
        return exit_code(status)
    client = _client(args.address)
    if args.action == "logs":
        if args.follow:
            return exit_code(follow(args.address, args.job_id))
        print(client.get_job_logs(args.job_id), end="")
    elif args.action == "status":
        print(client.get_job_status(args.job_id).value)
    elif args.action == "stop":
        stopped = client.stop_job(args.job_id)
        print(f"job {args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
