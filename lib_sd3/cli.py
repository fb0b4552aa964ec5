"""``python -m lib_sd3 <command>``: the extension's tools that run outside the WebUI.

Each command lives in its own module with ``add_parser(subparsers)``, which adds its sub-parser
and sets ``run`` (args -> exit code). A new command is one more name in :data:`COMMANDS`; modules
are imported only when the parser is built, and they must not import torch at module level, so
``--help`` and the doctor stay instant.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

COMMANDS: tuple[str, ...] = ("lib_sd3.doctor",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_sd3", description="sd-webui-sd3 command-line tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)
