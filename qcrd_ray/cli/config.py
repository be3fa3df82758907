"""``qcrd config show``: print the resolved configuration as YAML."""

from __future__ import annotations

import argparse

from qcrd_ray.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    show = sub.add_parser("show", help="print the resolved config (defaults <- --config <- --set) as YAML")
    add_config_arguments(show)


def run(args: argparse.Namespace) -> int:
    from qcrd_ray.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0
