"""`stn-pipeline run`: the whole pipeline on this machine, with progress and a summary.

With no arguments: makes the default data set under ``<home>/data`` if it is not there, runs
ImageExampleGen -> validation -> Trainer -> Evaluator -> ModelCheck -> Pusher -> PushApproval
with LocalDagRunner, and prints what happened. A failing component ends the command with exit
status 1 and the component's error in words.
"""

import contextlib
import logging
import os
import sys
import warnings

from components.multiworker_config import BACKENDS
from pipeline.configs import RUNNING_MODES, PipelineConfig, check_directory, load_config

# Our loggers keep INFO (epoch lines, data set progress); the libraries' INFO lines, which
# drown the progress lines, show with --verbose only.
_OWN_LOGGERS = ("pipeline", "components", "stn_model")
HOME_HELP = f"output home (default: the config's home, else {PipelineConfig.home})"


def register(subparsers):
    parser = subparsers.add_parser(
        "run",
        help="run the whole pipeline locally (makes the default data set if needed)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument(
        "--data-root",
        help="data root of span-N folders (default: the config's data_root, else <home>/data)",
    )
    add_run_arguments(parser)
    parser.set_defaults(func=run)


def add_run_arguments(parser):
    """The options that shape a pipeline run (shared with `watch`), all but --data-root."""
    parser.add_argument("--home", help=HOME_HELP)
    parser.add_argument("--config", metavar="FILE", help="YAML file of config fields")
    parser.add_argument("--model", help="cnn, st_cnn_affine (default), st_cnn_projective, ...")
    parser.add_argument(
        "--epochs", type=int, help=f"training epochs (default {PipelineConfig.epochs})"
    )
    parser.add_argument("--train-steps", type=int, help="train this many steps instead of epochs")
    parser.add_argument("--batch-size", type=int, help="per-replica batch size (default 128)")
    parser.add_argument("--accuracy-floor", type=float, help="accuracy needed to bless")
    parser.add_argument("--direct-running-mode", choices=RUNNING_MODES, help="Beam DirectRunner")
    parser.add_argument("--direct-num-workers", type=int, help="Beam DirectRunner workers")
    parser.add_argument(
        "--beam-arg",
        action="append",
        dest="beam_args",
        metavar="ARG",
        help="a Beam pipeline argument, passed unchanged (repeatable)",
    )
    parser.add_argument("--no-cache", action="store_true", help="rerun cached components")
    parser.add_argument(
        "--workers", type=int, help="training workers (MultiWorkerMirroredStrategy; default 1)"
    )
    parser.add_argument("--backend", choices=BACKENDS, help="where training workers run")
    parser.add_argument(
        "--mixed-precision", action="store_true", help="train in mixed_float16 (GPU workers)"
    )


def config_from_args(args):
    """The `PipelineConfig` of the file in ``--config`` with the command line's overrides."""
    workers = {
        "num_workers": args.workers,
        "backend": args.backend,
        "mixed_precision": True if args.mixed_precision else None,
    }
    return load_config(
        args.config,
        multiworker_updates={name: value for name, value in workers.items() if value is not None},
        home=args.home,
        data_root=args.data_root,
        model=args.model,
        epochs=args.epochs,
        train_steps=args.train_steps,
        batch_size=args.batch_size,
        accuracy_floor=args.accuracy_floor,
        direct_running_mode=args.direct_running_mode,
        direct_num_workers=args.direct_num_workers,
        beam_args=tuple(args.beam_args) if args.beam_args else None,
        enable_cache=False if args.no_cache else None,
    )


def ensure_data(config, report, write=True):
    """Make the default data set under ``<home>/data`` unless a data root already has spans;
    with `write` False, only check the paths and settings that needs (ValueError if one is bad)."""
    from pipeline import distorted_mnist, spans

    check_home(config)
    if config.data_root is not None:
        check_directory(config.data_dir, "the data root", must_exist=True)
        return
    check_directory(config.data_dir, "the data folder")
    if any(name.startswith("span-") for name in _listdir(config.data_dir)):
        return
    try:
        distorted_mnist.check_canvas(config.image_size)
    except ValueError as error:
        raise ValueError(f"config field 'image_size' (the default data's {error})") from None
    if not write:
        return
    report(f"making the default data set under {config.data_dir}")
    spans.write_span(
        config.data_dir, span=1, canvas=config.image_size, report=lambda line: report("  " + line)
    )


def check_home(config):
    """Raise ValueError unless the home can be a local folder: ML Metadata's SQLite file and
    the home's lock live there (a URI would be made a local folder of that name)."""
    if "://" in config.home:
        raise ValueError(
            f"the home {config.home} is a URI; a local run needs a local folder (ML Metadata's "
            "SQLite database and the home's lock live there)"
        )
    check_directory(config.home_dir, "the home")


def _listdir(path):
    return os.listdir(path) if os.path.isdir(path) else []


def run(args):
    from pipeline import watcher

    def report(line):
        print(line, flush=True)

    try:
        config = config_from_args(args)
        ensure_data(config, report, write=False)  # a bad path fails here, before any write
        os.makedirs(config.home_dir, exist_ok=True)
        # One run or watcher per home: two would race on the data, ML Metadata and serving/.
        with watcher.exclusive_lock(os.path.join(config.home_dir, watcher.LOCK_FILE)):
            ensure_data(config, report)
            verbose = getattr(args, "verbose", False)
            if not verbose:
                os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
            with contextlib.nullcontext() if verbose else quiet_libraries():
                return _run_pipeline(config, report)
    except ValueError as error:
        print(f"stn-pipeline run: {error}", file=sys.stderr)
        return 2
    except watcher.WatcherBusy as error:
        print(f"stn-pipeline run: {error}", file=sys.stderr)
        return watcher.EXIT_BUSY


def _run_pipeline(config, report):
    """Run `config`'s pipeline with progress lines and a summary; the exit status."""
    from pipeline import local_runner, summary

    tfx_pipeline = local_runner.local_pipeline(config)
    progress = summary.Progress(local_runner.component_ids(tfx_pipeline))
    from absl import logging as absl_logging

    # TFX logs through absl. Set the level through absl's own flag: TensorFlow's SavedModel
    # writer saves and restores that flag, and would otherwise leave the logger at WARNING.
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger("absl").addHandler(progress)
    report(f"running {config.pipeline_name}: home {config.home_dir}, data {config.data_dir}")
    failed = None
    try:
        local_runner.run_local(tfx_pipeline)
    except Exception as error:  # a failing component: say which one and why, in words
        failed = (progress.current or "the pipeline", error)
    finally:
        logging.getLogger("absl").removeHandler(progress)
    result = None
    try:
        result = summary.run_report(config)
        report(summary.format_report(result))
    except Exception as error:  # the summary must not hide the run's own outcome
        print(f"stn-pipeline run: could not read the run's results: {error}", file=sys.stderr)
    if failed:
        where, error = failed
        print(f"\nFAILED: {where}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if result is not None and result.spans:
        _record_for_watch(config, result)
    return 0


def _record_for_watch(config, result):
    """Record the finished run's spans in the home's watch state, as a watcher's run is, so
    that `watch` does not train on them again."""
    from pipeline import watcher

    state = watcher.WatchState(os.path.join(config.home_dir, watcher.STATE_FILE))
    try:
        state.record(watcher.RunOutcome.of(result))
    except (watcher.WatchStateError, OSError) as error:  # the run itself succeeded
        print(f"stn-pipeline run: not recorded for `watch`: {error}", file=sys.stderr)


@contextlib.contextmanager
def quiet_libraries():
    """Within the block, show our INFO lines (indented) and the libraries' errors, and hide the
    libraries' chatter; the loggers are as they were after it."""
    loggers = [logging.getLogger(name) for name in ("", "absl", "tensorflow", *_OWN_LOGGERS)]
    saved = [(lg, lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    absl_logger = logging.getLogger("absl")
    absl_logger.propagate = False
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    absl_logger.addHandler(errors)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    indented = logging.StreamHandler(sys.stdout)
    indented.setFormatter(logging.Formatter("      %(message)s"))
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(indented)
        logging.getLogger(name).propagate = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for logger, level, propagate, handlers in saved:
            logger.setLevel(level)
            logger.propagate = propagate
            logger.handlers[:] = handlers
