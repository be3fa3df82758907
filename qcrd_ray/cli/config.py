"""``qcrd config show``: print the resolved configuration as YAML. ``qcrd config explain [KEY]``: each key's
default, allowed values and help, read from the field declarations in qcrd_ray/config.py."""

from __future__ import annotations

import argparse

from qcrd_ray.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    show = sub.add_parser("show", help="print the resolved config (defaults <- --config <- --set) as YAML")
    add_config_arguments(show)
    explain = sub.add_parser(
        "explain", help="explain config keys: default, choices or range, meaning",
        description="Print each config key with its default, its choices or range and what it means.",
    )
    explain.add_argument("key", nargs="?", metavar="KEY",
                         help="a key (train.lr, student.lora.r), a section (train) or a group (student.lora); "
                              "every key when left out")


def run(args: argparse.Namespace) -> int:
    if args.action == "explain":
        from qcrd_ray.config import describe

        print(explain_text(describe(args.key)), end="")
        return 0
    from qcrd_ray.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _show(value) -> str:
    """A default as YAML writes it: null, true, [a, b], {}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if value == "":
        return "''"
    return str(value)


def explain_text(node, width: int | None = None) -> str:
    """``node`` (a :class:`~qcrd_ray.config.KeyHelp`) for a terminal: per key a line ``key  default  allowed``
    (columns aligned within its section) and its help wrapped below it; a section or group is a heading."""
    import shutil
    import textwrap

    width = width or max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    indent = " " * 6
    lines: list[str] = []

    def emit_keys(keys) -> None:
        key_w = min(max(len(k.key) for k in keys), 40)
        default_w = min(max(len(_show(k.default)) for k in keys), 24)
        for k in keys:
            lines.append(f"  {k.key:<{key_w}}  {_show(k.default):<{default_w}}  {k.allowed}".rstrip())
            lines.extend(textwrap.wrap(k.help, width, initial_indent=indent, subsequent_indent=indent))

    def emit(n) -> None:
        if not n.is_group:
            emit_keys([n])
            return
        if n.key:  # the whole config (key "") has no heading of its own
            if lines:
                lines.append("")
            lines.extend(textwrap.wrap(f"{n.key}: {n.help}", width, subsequent_indent="  "))
        plain = [k for k in n.keys if not k.is_group]
        if plain:
            emit_keys(plain)
        for k in n.keys:
            if k.is_group:
                emit(k)

    emit(node)
    return "\n".join(lines) + "\n"
