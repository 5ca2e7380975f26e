"""Compiles the retraining step for self-hosted Kubeflow Pipelines (the open-source backend).

    compile_watch_package(config, "stn.yaml")

TFX's KubeflowV2DagRunner targets managed pipelines (Vertex AI): the open-source KFP backend
does not implement the resolver its package uses to find the last blessed model, nor the
ExampleGen driver hook that resolves spans. This package is what that backend runs: one step,
`python -m pipeline.kfp_step` (`stn-pipeline watch --once`), which runs the whole TFX pipeline
with the Beam runner and ML Metadata on the shared volume, as the k8s/ CronJob does. It is
compiled by the kfp SDK, with kfp-kubernetes for the volumes:

- the pipeline parameter `config_yaml`, by default the config it was compiled from;
- caching off (a cached step would never see new spans);
- the claims of k8s/base/storage.yaml mounted as in the CronJob, the home's at the config's home
  and the models' at <home>/serving, so the claims must exist in the namespace the runs use;
- the CronJob's CPU and memory requests and limits, and the pod's namespace, name and uid as
  STN_NAMESPACE, STN_POD_NAME and STN_POD_UID for the trainer's Kubernetes backend.
"""

import dataclasses
import json
import os

from pipeline.kubeflow_runner import check_package_path

HOME_CLAIM = "stn-pipeline-root"
MODELS_CLAIM = "stn-models"
STEP_COMMAND = ("python", "-m", "pipeline.kfp_step")
POD_FIELDS = {
    "STN_NAMESPACE": "metadata.namespace",
    "STN_POD_NAME": "metadata.name",
    "STN_POD_UID": "metadata.uid",
}


def config_text(config):
    """`config` as config-file text that `load_config` reads back to the same config.

    One line of JSON (which is YAML): the kfp compiler copies defaults into a comment line of
    the package, where a line break would end the comment.
    """
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    return json.dumps(values, sort_keys=True)


def compile_watch_package(config, output_path, image=None):
    """Write the one-step KFP package of `config` to `output_path` (.yaml/.yml); return it.

    `image` defaults to `config.container_image`.
    """
    from kfp import compiler, dsl, kubernetes

    check_package_path(output_path)
    image = image or config.container_image

    @dsl.container_component
    def retrain(config_yaml: str):
        """Train on a new span of data, if one arrived; push the model if it is blessed."""
        return dsl.ContainerSpec(image=image, command=list(STEP_COMMAND), args=[config_yaml])

    @dsl.pipeline(
        name=config.pipeline_name,
        description=f"{config.pipeline_name}: stn-pipeline watch --once on {config.data_dir}",
    )
    def watch_once(config_yaml: str = config_text(config)):
        task = retrain(config_yaml=config_yaml)
        task.set_caching_options(False)
        # k8s/base/retrain-cronjob.yaml's requests and limits
        task.set_cpu_request("2").set_cpu_limit("4")
        task.set_memory_request("6Gi").set_memory_limit("12Gi")
        kubernetes.mount_pvc(task, HOME_CLAIM, config.home_dir)
        kubernetes.mount_pvc(task, MODELS_CLAIM, os.path.join(config.home_dir, "serving"))
        for name, field_path in POD_FIELDS.items():
            kubernetes.use_field_path_as_env(task, name, field_path)

    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    compiler.Compiler().compile(watch_once, str(output_path))
    return output_path
