"""`stn-pipeline compile --kubeflow FILE.yaml`: the pipeline as a Kubeflow Pipelines package.

Writes a KFP v2 YAML package that `stn-pipeline schedule` (or the Kubeflow UI) uploads. With
--target kubeflow (the default), for the open-source KFP backend: one step that runs `watch
--once` on the shared volume, the whole pipeline inside it. With --target vertex, for Vertex AI
Pipelines: one step per TFX component (TFX's KubeflowV2DagRunner). Paths in the configuration
are taken as seen inside the cluster: the home defaults to the shared volume at /stn/home
unless the config file or --home sets it.
"""

import os
import sys

from pipeline.configs import check_directory, load_config

TARGETS = ("kubeflow", "vertex")


def register(subparsers):
    parser = subparsers.add_parser(
        "compile",
        help="compile the pipeline for Kubeflow Pipelines (a KFP v2 YAML package)",
        description=__doc__.split("\n\n")[1],
    )
    add_compile_arguments(parser)
    parser.add_argument(
        "--kubeflow", required=True, metavar="FILE.yaml", help="the package file to write"
    )
    parser.set_defaults(func=run)


def add_compile_arguments(parser):
    """The options that say how to compile (shared with `schedule`)."""
    from pipeline.kubeflow_runner import DEFAULT_KUBEFLOW_HOME

    parser.add_argument("--config", metavar="FILE", help="YAML file of config fields")
    parser.add_argument(
        "--home",
        help="the home as the pipeline's pods see it (default: the config's home, else "
        f"{DEFAULT_KUBEFLOW_HOME})",
    )
    parser.add_argument("--data-root", help="data root as the pods see it (default <home>/data)")
    parser.add_argument(
        "--image", help="container image of every step (default: the config's container_image)"
    )
    parser.add_argument(
        "--target",
        choices=TARGETS,
        help="kubeflow: open-source Kubeflow Pipelines, one step running `watch --once` "
        "(default); vertex: Vertex AI Pipelines, one step per TFX component",
    )
    parser.add_argument(
        "--pipeline-root",
        help="--target vertex: where artifacts go, e.g. gs://bucket/stn (default: the config's "
        "kubeflow_pipeline_root, else <home>/pipeline_root)",
    )


def target_of(args):
    """The --target asked for, else kubeflow (no argparse default: `schedule --package` must
    see whether one was given)."""
    return args.target or TARGETS[0]


def compile_from_args(args, output_path):
    """Compile the pipeline that `args` describe to `output_path`; return the config used."""
    from pipeline import kubeflow_runner, kubeflow_watch

    target = target_of(args)
    if args.pipeline_root and target != "vertex":
        raise ValueError(
            "--pipeline-root is for --target vertex: the kubeflow target keeps its artifacts "
            "under the home's pipeline_root"
        )
    config = load_config(
        args.config,
        defaults={"home": kubeflow_runner.DEFAULT_KUBEFLOW_HOME},
        home=args.home,
        data_root=args.data_root,
        container_image=args.image,
        kubeflow_pipeline_root=args.pipeline_root,
    )
    check_directory(os.path.dirname(os.path.abspath(output_path)), "the package's folder")
    if target == "vertex":
        _check_cluster_paths(config)
        kubeflow_runner.compile_for_kubeflow(
            config, output_path, config.container_image, config.kubeflow_pipeline_root
        )
    else:
        kubeflow_watch.compile_watch_package(config, output_path, config.container_image)
    return config


def _check_cluster_paths(config):
    """Raise ValueError unless the home, data root and pipeline root are absolute paths or URIs:
    a relative one would be made absolute on this machine, a folder the pods do not have."""
    for name in ("home", "data_root", "kubeflow_pipeline_root"):
        path = getattr(config, name)
        if path is not None and "://" not in path and not os.path.isabs(path):
            raise ValueError(
                f"config field {name!r} must be an absolute path or a URI (gs://...) as the "
                f"pipeline's pods see it; got {path!r}"
            )


def run(args):
    try:
        config = compile_from_args(args, args.kubeflow)
    except ValueError as error:
        print(f"stn-pipeline compile: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.kubeflow}: pipeline {config.pipeline_name} for {target_of(args)}, "
        f"image {config.container_image}"
    )
    return 0
