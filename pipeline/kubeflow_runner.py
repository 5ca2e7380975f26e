"""Compiles the pipeline, one step per TFX component, with TFX's KubeflowV2DagRunner.

    compile_for_kubeflow(config.replace(container_image="REGISTRY/stn-pipeline:0.1.0"), "stn.yaml")

The output is a KFP v2 package: the `PipelineSpec` as YAML, the form the kfp 2.x `Client`
uploads. TFX documents this runner as "currently for managed pipelines": the package needs a
backend that runs its resolver tasks (the last blessed model) and the ExampleGen driver hook
(`lifecycle.preCacheCheck`, which resolves the span), as Vertex AI Pipelines does; the
open-source KFP backend implements neither (`pipeline.kubeflow_watch` builds what it runs).
Every step runs in `image` and ML Metadata is the backend's own, so the pipeline gets no
metadata connection; the paths in `config` (data root, serving directory) must be paths every
step sees, and the pipeline root (where artifacts go) is written into the package as its
`defaultPipelineRoot`.
"""

import os

import yaml

# Where k8s/ mounts the shared volume that holds the data, the pipeline root and serving/.
DEFAULT_KUBEFLOW_HOME = "/stn/home"
# The image's ENTRYPOINT is `stn-pipeline`; TFX's KFP v2 executor entry point replaces it.
EXECUTOR_COMMAND = (
    "python",
    "-m",
    "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor",
)


def kubeflow_pipeline(config, pipeline_root=None):
    """`create_pipeline(config)` for Kubeflow: no local ML Metadata; `pipeline_root` if given."""
    from pipeline.pipeline import create_pipeline  # TFX: loaded on use, so `--help` stays fast

    tfx_pipeline = create_pipeline(config, None, config.beam_pipeline_args())
    if pipeline_root:
        tfx_pipeline.pipeline_info.pipeline_root = pipeline_root
    return tfx_pipeline


def pipeline_spec(tfx_pipeline, image):
    """The KFP `PipelineSpec` of `tfx_pipeline` as a dict (what the YAML package holds)."""
    from tfx import v1 as tfx

    if not image:
        raise ValueError("image must name the container image the pipeline's steps run in")
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(
            default_image=image, default_commands=list(EXECUTOR_COMMAND)
        )
    )
    job = runner.run(tfx_pipeline, write_out=False)
    spec = job["pipelineSpec"]
    spec["defaultPipelineRoot"] = job["runtimeConfig"]["gcsOutputDirectory"]
    return spec


def check_package_path(output_path):
    """Raise ValueError unless `output_path` names a package the kfp Client uploads."""
    if not str(output_path).endswith((".yaml", ".yml")):
        raise ValueError(
            f"output file {output_path} must end in .yaml or .yml (the kfp Client uploads those)"
        )


def compile_for_kubeflow(config, output_path, image=None, pipeline_root=None):
    """Write the KFP package of `config`'s pipeline to `output_path` (.yaml/.yml); return it.

    `image` defaults to `config.container_image`.
    """
    check_package_path(output_path)
    spec = pipeline_spec(kubeflow_pipeline(config, pipeline_root), image or config.container_image)
    # TFX's driver, which this package runs, fingerprints span N only, and by file count, total
    # size and whole-second mtimes: an image moved between label folders or an edited manifest
    # (or a rewritten older span of a window) would hit the cache. Ingest always runs.
    spec["root"]["dag"]["tasks"]["ImageExampleGen"]["cachingOptions"] = {"enableCache": False}
    folder = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(folder, exist_ok=True)
    with open(output_path, "w") as handle:
        handle.write(f"# {config.pipeline_name}: compiled by stn-pipeline for Kubeflow Pipelines\n")
        yaml.safe_dump(spec, handle, sort_keys=True)
    return output_path
