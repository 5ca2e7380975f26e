"""`stn-pipeline serve`: serve the pushed model on TF Serving's REST API, hot-loading versions."""

import argparse
import logging
import os
import signal
import sys
import threading

from pipeline.configs import PipelineConfig, check_directory

log = logging.getLogger(__name__)


def _parsed(convert, text, what):
    """`convert(text)`, or an argparse error that says `text` is not `what`."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _positive_float(text):
    value = _parsed(float, text, "a number of seconds")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _port(text):
    value = _parsed(int, text, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text}")
    return value


def _positive_int(text):
    value = _parsed(int, text, "a byte count")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive byte count, got {text}")
    return value


def register(subparsers):
    parser = subparsers.add_parser(
        "serve",
        help="serve the pushed model on TF Serving's REST API",
        description="Serve <home>/serving/<model-name>/<version>/ on TF Serving's REST API "
        "(GET /v1/models/NAME, POST /v1/models/NAME:predict); a newer pushed version is "
        "loaded without a restart, and a version that fails to load leaves the current one "
        "serving.",
    )
    parser.add_argument(
        "--home", default=PipelineConfig.home, help="output home (default: %(default)s)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on, IPv4 or IPv6 (0.0.0.0 or :: for all; default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=8501,
        help="port; 0 picks a free one (default: %(default)s, TF Serving's REST port)",
    )
    parser.add_argument(
        "--model-name", default=PipelineConfig.model_name, help="model name (default: %(default)s)"
    )
    parser.add_argument(
        "--poll-seconds",
        type=_positive_float,
        default=2.0,
        help="how often to look for new versions (default: %(default)s)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=16 * 1024 * 1024,
        help="larger request bodies are refused with 413 (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args):
    from pipeline.model_repository import ModelRepository
    from pipeline.model_server import ModelServer

    try:
        repository = ModelRepository(os.path.join(args.home, "serving"), args.model_name)
        check_directory(repository.model_dir, "the model folder")
        server = ModelServer(
            repository, (args.host, args.port), args.poll_seconds, args.max_request_bytes
        )
    except ValueError as error:  # a bad model name, a --home that is a file
        print(f"stn-pipeline serve: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the port is taken, the host unknown
        print(f"stn-pipeline serve: error: {args.host}:{args.port}: {error}", file=sys.stderr)
        return 2
    repository.poll()
    if repository.served() is None:
        log.warning(
            "no loadable version under %s yet; polling every %g s",
            repository.model_dir,
            args.poll_seconds,
        )
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.start_polling()
    log.info("listening on %s/v1/models/%s", server.url, args.model_name)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    log.info("stopped")
    return 0
