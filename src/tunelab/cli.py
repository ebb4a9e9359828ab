"""The ``tunelab`` command: a table from verb to the module that implements it.

Each module listed in ``COMMANDS`` has ``register(subparsers)``, which adds its
sub-command(s) with ``set_defaults(func=...)``; ``func(args) -> int`` is a thin
wrapper over a plain Python function that notebooks can call directly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from tunelab import __version__
from tunelab.errors import TunelabError

# verb -> module with register(subparsers); imported lazily so `tunelab --help` is fast.
COMMANDS = {
    "data": "tunelab.data.cli",
    "train": "tunelab.train.cli",
    "export": "tunelab.train.export_cli",
    "estimate": "tunelab.export.estimate_cli",
    "eval": "tunelab.eval.cli",
    "chat": "tunelab.chat",
    "serve": "tunelab.serve.cli",
    "demo": "tunelab.demo",
    "env": "tunelab.env",
    "studio": "tunelab.studio.cli",
}


def build_parser(verbs: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    parser.add_argument("--threads", dest="global_threads", metavar="N",
                        help="torch CPU threads for any command (default: decided from the free cores; "
                             "also $TUNELAB_THREADS)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb, module_name in COMMANDS.items():
        if verbs is not None and verb not in verbs:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("tunelab"):
                continue  # verb not built yet in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OMP_WAIT_POLICY is left to OpenMP's default (waiting threads spin a little, then
    # sleep): on an idle 2-core AVX2 VM, 2 threads trained at 155-160 tok/s with it and 104
    # with PASSIVE (1 thread: 117). Spinning hurts only when another process wants the
    # core, and then tunelab.hardware runs fewer threads, so none wait (docs/training.md).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers reads this at import: no "Loading weights" bar on every model load.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([verb] if verb in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_libraries(args.verbose)
    try:
        if args.global_threads is not None:
            from tunelab.hardware import THREADS_ENV, requested_threads

            os.environ[THREADS_ENV] = str(requested_threads(args.global_threads))
        return int(args.func(args) or 0)
    except TunelabError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_libraries(verbose: bool) -> None:
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes
        logging.getLogger("transformers").setLevel(logging.ERROR)
