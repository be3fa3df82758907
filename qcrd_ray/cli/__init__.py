"""The ``qcrd`` command. Each subcommand lives in its own module of this package and is imported only when run,
so ``qcrd --help`` stays fast (Ray and torch are not imported to print help)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module under qcrd_ray.cli, one-line purpose). Each module defines add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "Run the whole pipeline (teach -> train -> eval -> report) on a local or remote Ray cluster"),
    "teach": ("teach", "Sample K teacher rationales per question on Ray Data and split them by self-consistency"),
    "train": ("train", "Train the student (qcrd | dss | finetune) with Ray Train; resumes an existing run"),
    "eval": ("evaluate", "Score a trained student on a split (predict or explain mode)"),
    "report": ("report", "Rebuild a run's report (report.md + figures) from its outputs"),
    "serve": ("serve", "Serve a trained student over HTTP with Ray Serve"),
    "data": ("data", "Inspect a dataset: rows, rejected rows with reasons, label distribution"),
    "config": ("config", "The resolved configuration (`show`) and what every key means (`explain`)"),
    "sweep": ("sweep", "Run a grid / random search of full teach -> train -> eval trials on Ray Tune"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every stage takes: a YAML file, ``--set section.key=value`` overrides and ``--verbose``."""
    parser.add_argument("--config", "-c", help="YAML config file (`qcrd config explain` says what every key means)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.rounds=3 (repeatable)",
    )
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also print INFO logs, Ray's own output and every worker's output (progress bars "
                             "included); by default they go to the log files only")


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """``--force`` of the commands that write a run and so hold its lease (``qcrd_ray.lease``)."""
    parser.add_argument("--force", action="store_true",
                        help="take the run over from another driver that still holds it (that driver stops at "
                             "its next heartbeat); without it such a run is refused")


def load_config_from_args(args: argparse.Namespace, config=None, **flags: str):
    """A command's config: defaults <- ``--config`` (or ``config``) <- ``--set`` <- the command's own flags.

    ``flags`` maps an argument name to the key it sets (``data="data.data_dir"``); unset flags change nothing.
    Values are JSON-quoted so a path or name is never re-read as YAML (``on``, ``1e3``, ``a: b``).
    """
    import json

    from qcrd_ray.config import load_config

    overrides = list(args.overrides)
    for arg, key in flags.items():
        value = getattr(args, arg, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    from qcrd_ray.config import Config, apply_overrides

    if isinstance(config, Config):  # a trained model's own config (qcrd_ray.runs): the overrides apply on top
        return config.replace(**apply_overrides({}, overrides))
    return load_config(config if config is not None else args.config, overrides)


# the arguments of each command that name a run location, checked by check_locations before the command runs
LOCATION_ARGS: dict[str, tuple[str, ...]] = {
    "run": ("out",), "teach": ("out",), "train": ("out", "teacher"), "eval": ("model", "out"),
    "report": ("out",), "serve": ("model",), "sweep": ("out",),
}


def check_locations(args: argparse.Namespace) -> None:
    """Refuse, before anything is written, a location that the other nodes of a multi-node cluster cannot reach
    (``storage.check_shared``). Only a cluster that exists already can have other nodes: a command that starts
    its own local Ray (no ``--address``, no ``RAY_ADDRESS``) is not checked, and Ray is not started for it."""
    import os

    import ray

    from qcrd_ray import storage

    names = LOCATION_ARGS.get(args.command, ())
    locations = [getattr(args, n) for n in names if getattr(args, n, None) is not None]
    if args.command == "run" and args.out is None:  # qcrd run's default, runs/<task>, is relative
        locations.append(os.path.join("runs", args.task or "<task>"))
    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    if not locations or not (ray.is_initialized() or address):
        return
    from qcrd_ray.ray_utils import init_ray

    init_ray(address)
    multi_node = storage.is_multi_node()
    for location in locations:
        storage.check_shared(location, multi_node)


def build_parser(load_subcommands: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcrd",
        description="Distil an LLM's reasoning into a small seq2seq student with QCRD, on Ray.",
        epilog="Run `qcrd <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, purpose) in COMMANDS.items():
        p = sub.add_parser(name, help=purpose, description=purpose)
        if name == load_subcommands:
            importlib.import_module(f"qcrd_ray.cli.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load_subcommands=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from qcrd_ray import console, storage
    from qcrd_ray.config import ConfigError
    from qcrd_ray.lease import LeaseError

    module = importlib.import_module(f"qcrd_ray.cli.{COMMANDS[args.command][0]}")
    try:
        with console.session(verbose=getattr(args, "verbose", False)):
            check_locations(args)
            return int(module.run(args) or 0)
    except ConfigError as e:
        print(f"qcrd {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except storage.StorageError as e:
        print(f"qcrd {args.command}: {e}", file=sys.stderr)
        return 2
    except LeaseError as e:  # another driver holds the run, or took it over from this one
        print(f"qcrd {args.command}: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"qcrd {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
