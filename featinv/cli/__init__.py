"""``featinv <command>``: a thin face over the Python API.

This package face holds ``main`` and the parser only, and is the one module that imports the
command modules (each registers its commands); what several commands share lives in
:mod:`featinv.cli.options`, and command modules never import each other. Input a user can fix is
reported as one line ``featinv: error: ...`` with exit code 2, and a failed command leaves no
partial output behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from featinv.cli.options import (
    Parser,
    add_trust_code_arg,
    check_output_location,
    given_options,
    refuse_unmet,
    walk_parsers,
)
from featinv.errors import FeatInvError


def build_parser() -> argparse.ArgumentParser:
    """The ``featinv`` parser, every command registered by its module (imported here, lazily: the
    commands import torch only when they run)."""
    import featinv
    from featinv.cli import analysis, convert, demo, model, reconstruct, serve, training

    parser = Parser(prog="featinv", description="See what an image classifier sees: invert its feature maps.")
    parser.add_argument("--version", action="version", version=f"featinv {featinv.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    model.add_info_command(commands)
    reconstruct.add_reconstruct_command(commands)
    model.add_create_command(commands)
    convert.add_convert_command(commands)
    demo.add_demo_command(commands)
    training.add_training_commands(commands)
    model.add_export_command(commands)
    analysis.add_analysis_commands(commands)
    serve.add_serve_command(commands)
    model.add_extract_command(commands)
    for each in walk_parsers(parser):  # every command that reads a model folder may meet a user module's
        flags = {flag for action in each._actions for flag in action.option_strings}
        if "--model" in flags and "--trust-code" not in flags and each.prog != "featinv info":
            add_trust_code_arg(each)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line; its exit code: 0, 2 for input a user can fix, 1 for what the system refused."""
    try:  # a usage error (argparse's, one line) or --help: its exit code, returned like any other
        args = build_parser().parse_args(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 2
    try:
        refuse_unmet(args, given_options(build_parser(), argv))
        if getattr(args, "out", None) is not None:
            check_output_location(args.out, folder=not getattr(args, "writes_file", False))
        return args.func(args)
    except FeatInvError as error:
        print(f"featinv: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path that cannot be read or written, a full disk: the system's words
        where = f": {error.filename}" if error.filename else ""
        print(f"featinv: error: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("featinv: interrupted", file=sys.stderr)
        return 130
