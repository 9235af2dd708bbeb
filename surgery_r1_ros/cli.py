"""The ``surgery-r1`` command. Each subsystem adds its own subcommands through ``register``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules with a ``register(subparsers)`` function. They import their heavy dependencies lazily,
# inside the command handlers, so `surgery-r1 --help` stays fast.
COMMAND_MODULES = (
    "surgery_r1_ros.training.commands",
    "surgery_r1_ros.data.commands",
    "surgery_r1_ros.engine.commands",
    "surgery_r1_ros.bag.commands",
    "surgery_r1_ros.demo",
    "surgery_r1_ros.export.commands",
    "surgery_r1_ros.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgery-r1", description="Surgery-R1: grounded surgical visual question answering for the dVRK."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Bad input: say what was wrong in one line instead of a traceback (use -v for the traceback).
        if args.verbose:
            raise
        print(f"surgery-r1 {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
