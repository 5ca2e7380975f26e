"""`stn-pipeline report`: an HTML page with pictures of a pipeline run.

Writes ``<home>/reports/<run>/index.html`` and its PNG figures for the latest run (or the one
named by --run): input digits beside what the transformer made of them, per distortion; the
learned sampling grids; training curves; per-slice metrics; anomalies; the blessing decision
against the baseline; the push. The folder is self-contained (relative links only).
"""

import os
import sys

from pipeline.configs import load_config
from pipeline.run_cmd import HOME_HELP


def register(subparsers):
    parser = subparsers.add_parser(
        "report",
        help="write an HTML report of the latest pipeline run (or --run RUN_ID)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--home", help=HOME_HELP)
    parser.add_argument("--config", metavar="FILE", help="YAML file of config fields")
    parser.add_argument("--run", metavar="RUN_ID", help="the pipeline run (default: the latest)")
    parser.set_defaults(func=run)


def run(args):
    try:
        config = load_config(args.config, home=args.home)
    except ValueError as error:
        print(f"stn-pipeline report: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
    from pipeline import report

    try:
        facts = report.collect_facts(config, args.run)
    except ValueError as error:
        print(f"stn-pipeline report: {error}", file=sys.stderr)
        return 2
    folder = os.path.join(config.home_dir, "reports", report.folder_name(facts.run_id))
    print(report.write_report(facts, folder))
    return 0
