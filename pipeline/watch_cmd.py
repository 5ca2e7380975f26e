"""`stn-pipeline watch --data-root DIR`: retrain whenever a new span of data arrives.

Polls DIR every --interval seconds for complete span-N folders; when one newer than every span
trained on appears, runs the pipeline on it (or on the last --window consecutive spans, ingested
and validated together), warm-started from the model being served, and the Pusher serves the
new model only if the Evaluator blesses it.
No new data, no run. One run or watcher per home (a lock file); the spans trained on (by `run`
too) are kept in <home>/watch_state.json, so a restarted watcher carries on where it stopped.
"""

import argparse
import contextlib
import math
import os
import sys

from pipeline import run_cmd
from pipeline.configs import check_directory


def _seconds(text):
    """--interval: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def register(subparsers):
    parser = subparsers.add_parser(
        "watch",
        help="retrain automatically when new spans of data arrive",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument(
        "--data-root", required=True, help="the data root whose span-N folders to watch"
    )
    parser.add_argument(
        "--interval", type=_seconds, default=300.0, help="seconds between polls (default 300)"
    )
    parser.add_argument("--once", action="store_true", help="poll once, run if needed, exit")
    run_cmd.add_run_arguments(parser)
    parser.add_argument(
        "--window",
        type=int,
        help="train on the last K consecutive spans, fewer while fewer exist (default: the "
        "config's span_window, 1: the newest span)",
    )
    parser.set_defaults(func=run)


def run(args):
    from pipeline import watcher

    def report(line):
        print(line, flush=True)

    try:
        config = run_cmd.config_from_args(args)
        run_cmd.check_home(config)
        check_directory(config.data_dir, "the data root", must_exist=True)
        watch = watcher.Watcher(
            config.home_dir,
            config.data_dir,
            config.serving_dir,
            run_fn=watcher.pipeline_run_fn(config, report),
            window=config.span_window if args.window is None else args.window,
            report=report,
        )
    except ValueError as error:
        print(f"stn-pipeline watch: {error}", file=sys.stderr)
        return 2
    verbose = getattr(args, "verbose", False)
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    report(f"watching {config.data_dir} for new spans (home {config.home_dir})")
    try:
        with contextlib.nullcontext() if verbose else run_cmd.quiet_libraries():
            watch.watch(interval_s=args.interval, once=args.once)
    except watcher.WatcherBusy as error:
        print(f"stn-pipeline watch: {error}", file=sys.stderr)
        return watcher.EXIT_BUSY
    except watcher.WatchStateError as error:
        print(f"stn-pipeline watch: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # how a watcher is ended; a single run interrupted exits 130
        if args.once:
            raise
        report("stopped")
    except Exception as error:  # a failing run with --once: say why in words
        print(f"stn-pipeline watch: run failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0
