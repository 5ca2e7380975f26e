"""`stn-pipeline schedule --host URL --cron EXPR`: run the pipeline on Kubeflow on a schedule.

Compiles the pipeline (as `compile` does, or takes `--package FILE.yaml`), uploads it as a new
pipeline or a new version of the pipeline of that name, and creates the recurring run of that
name in the experiment, replacing an older one, so exactly one schedule exists there. On
multi-user Kubeflow, `--namespace` (a profile's) holds the pipeline, experiment and run.
"""

import os
import sys
import tempfile

from pipeline import compile_cmd

# What `add_compile_arguments` options change in a compiled package (not --config: it names
# the pipeline); with --package they would do nothing.
_COMPILE_ONLY = ("home", "data_root", "image", "target", "pipeline_root")


def register(subparsers):
    parser = subparsers.add_parser(
        "schedule",
        help="upload the pipeline to Kubeflow Pipelines and run it on a cron schedule",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline:8888"
    )
    parser.add_argument(
        "--cron",
        required=True,
        help="when to run: Unix cron (5 fields) or KFP cron (6, seconds first)",
    )
    parser.add_argument("--experiment", default="stn", help="KFP experiment (default stn)")
    parser.add_argument(
        "--namespace",
        help="multi-user KFP: the profile namespace of the pipeline, experiment and recurring "
        "run (default: kfp's, from ~/.config/kfp/context.json or the pod's own)",
    )
    parser.add_argument("--pipeline-name", help="KFP pipeline name (default: the config's)")
    parser.add_argument("--package", metavar="FILE.yaml", help="upload this compiled package")
    compile_cmd.add_compile_arguments(parser)
    parser.set_defaults(func=run)


def _namespace(args):
    """kfp.Client's `namespace` argument: given only if --namespace was (its default differs)."""
    return {"namespace": args.namespace} if args.namespace else {}


def run(args):
    import warnings

    import kfp
    import kfp_server_api
    import urllib3

    from pipeline import kfp_schedule
    from pipeline.configs import load_config

    try:
        kfp_schedule.kfp_cron(args.cron)
        if args.package:
            ignored = [
                f"--{name.replace('_', '-')}" for name in _COMPILE_ONLY if getattr(args, name)
            ]
            if ignored:
                raise ValueError(
                    f"{', '.join(ignored)} shape(s) a package as it is compiled; with --package "
                    "nothing is compiled: compile again, or leave them out"
                )
            kfp_schedule.check_package(args.package)
        with tempfile.TemporaryDirectory(prefix="stn-kfp-") as folder:
            if args.package:
                package, config = args.package, load_config(args.config)
            else:
                package = os.path.join(folder, "pipeline.yaml")
                config = compile_cmd.compile_from_args(args, package)
            name = args.pipeline_name or config.pipeline_name
            with warnings.catch_warnings():  # kfp warns that it needs KFP >= 2.0.0-beta.2
                warnings.simplefilter("ignore", FutureWarning)
                client = kfp.Client(host=args.host, **_namespace(args))
            if not client.get_user_namespace() and client.get_kfp_healthz().multi_user:
                raise ValueError(
                    "this Kubeflow Pipelines is multi-user: --namespace must name the "
                    "namespace of your profile"
                )
            done = kfp_schedule.schedule(
                client, package, name, args.cron, args.experiment, namespace=args.namespace
            )
    except ValueError as error:  # the command's own inputs: cron, config, package
        print(f"stn-pipeline schedule: {error}", file=sys.stderr)
        return 2
    except (
        RuntimeError,
        OSError,
        kfp_server_api.ApiException,
        urllib3.exceptions.HTTPError,  # cannot reach the host
    ) as error:
        print(f"stn-pipeline schedule: {error}", file=sys.stderr)
        return 1
    what = "new pipeline" if done.new_pipeline else "new version"
    print(f"uploaded {name}: {what} {done.version_id} (pipeline {done.pipeline_id})")
    print(
        f"recurring run {done.recurring_run_id} in experiment {args.experiment}"
        + (f" (namespace {args.namespace})" if args.namespace else "")
        + f": cron {done.cron!r}"
        + (f"; replaced {', '.join(done.replaced)}" if done.replaced else "")
    )
    return 0
