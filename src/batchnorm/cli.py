"""The ``batchnorm`` command.

Each subcommand lives with the code it drives and exposes two functions:
``add_arguments(parser)`` and ``main(args) -> int``. They are imported only when
their subcommand is used, so ``batchnorm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "lab": ("batchnorm.lab.cli", "run the experiments that test claims about batch normalization"),
    "bench": ("batchnorm.bench", "benchmark the fused kernels against torch.nn and a memory copy"),
    "bench-network": (
        "batchnorm.bench_network",
        "time whole training steps with torch.nn's BN layers, ours, and none",
    ),
    "doctor": ("batchnorm.diagnostics", "check a model for the classic batch-normalization bugs"),
    "compile": (
        "batchnorm.native",
        "compile the kernels now instead of at the first calls (e.g. while building an image)",
    ),
}


def _version() -> str:
    """The installed package's version (from its metadata: no import of torch)."""
    from importlib import metadata

    try:
        return metadata.version("batchnorm")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "(not installed)"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch normalization: library, kernels and lab.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None if argv is None or not argv else argv[0]
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if wanted == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        # (building the parser imports the commands' modules: a Ctrl-C there is one too)
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        command = args.command
        from batchnorm import _env
        from batchnorm.functional import backend_env_problem

        problem = (
            backend_env_problem()
            or _env.numba_threads_problem()
            or _env.output_cache_problem()
            or _env.switch_problem("BATCHNORM_NATIVE")
            or _env.switch_problem("BATCHNORM_PROGRESS")
        )
        if problem is not None:
            print(f"batchnorm {args.command}: {problem}", file=sys.stderr)
            return 2
        code: int = args._module.main(args)
    except KeyboardInterrupt:
        # Ctrl-C is how a user stops a long benchmark or diagnosis: a note, not a traceback
        # (``lab run`` catches it itself, to say how to resume)
        print(f"batchnorm{f' {command}' if command else ''}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
