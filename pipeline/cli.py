"""The `stn-pipeline` command line.

Each subcommand lives in its own module with `register(subparsers)`, which adds a parser and
sets `func(args) -> int`. Modules import TensorFlow and TFX inside `func` only, so `--help`
stays fast.
"""

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading

COMMAND_MODULES = [
    "pipeline.data_cmd",
    "pipeline.serve_cmd",
    "pipeline.run_cmd",
    "pipeline.compile_cmd",
    "pipeline.schedule_cmd",
    "pipeline.watch_cmd",
    "pipeline.report_cmd",
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="stn-pipeline",
        description="Train, evaluate and ship a Spatial Transformer Network classifier with TFX.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _exit(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_exits():
    """SIGTERM (how Kubernetes and process managers stop a process) raises SystemExit inside,
    so `finally:` blocks run: training workers stop, worker Jobs are deleted. A command may
    install its own handler (`serve` does). Only the main thread can handle signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with sigterm_exits():
        try:
            return args.func(args)
        except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback
            print(f"stn-pipeline {args.command}: interrupted", file=sys.stderr)
            return 128 + signal.SIGINT
        except OSError as error:  # a path that cannot be read or written: which, and why
            logging.getLogger(__name__).debug("%s failed", args.command, exc_info=True)
            where = f"{error.filename}: " if error.filename else ""
            print(f"stn-pipeline {args.command}: {where}{error.strerror or error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
