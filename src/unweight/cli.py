"""The ``unweight`` command: one entry point, one small module per subcommand in ``unweight.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Bad input raises :class:`~unweight.errors.UnweightError`; it is printed on one line and the exit
code is 2. Nothing else is caught: a traceback means a bug in unweight.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from unweight import __version__
from unweight.errors import UnweightError

# Order is the order of `unweight --help`.
COMMANDS = [
    "demo",
    "fetch",
    "inspect",
    "convert",
    "eval",
    "compress",
    "decompress",
    "verify",
    "export",
    "analyze",
    "plan",
    "study",
]


def _load(name: str):
    return importlib.import_module(f"unweight.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unweight",
        description="Measure and remove the redundancy in LLM weights, and prove what each removal costs.",
    )
    parser.add_argument("--version", action="version", version=f"unweight {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"unweight.commands.{name}":
                raise
            continue  # not built yet
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    if getattr(args, "threads", None):
        if args.threads < 1:
            print(f"unweight {args.command}: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args._run(args) or 0)
    except UnweightError as exc:
        print(f"unweight {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
