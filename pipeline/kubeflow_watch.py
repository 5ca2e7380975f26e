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
- the CronJob's CPU and memory requests and limits and its 6-hour deadline, and the pod's
  namespace, name and uid as STN_NAMESPACE, STN_POD_NAME and STN_POD_UID for the trainer's
  Kubernetes backend;
- the home the claims are mounted at as STN_KFP_HOME: the step refuses a `config_yaml` (which
  a run may change) whose home is elsewhere, where its models would not reach the served claim.

The config's home and data root must be absolute paths, its pipeline name one that KFP keeps
as it is, and Kubernetes workers (`backend: kubernetes`) must mount the home's claim at the home.
"""

import dataclasses
import math
import os
import re

import yaml

from pipeline.configs import ConfigDumper
from pipeline.kubeflow_runner import check_package_path

HOME_CLAIM = "stn-pipeline-root"
MODELS_CLAIM = "stn-models"
STEP_COMMAND = ("python", "-m", "pipeline.kfp_step")
DEADLINE_S = 6 * 3600  # k8s/base/retrain-cronjob.yaml's activeDeadlineSeconds
HOME_ENV = "STN_KFP_HOME"  # where the package mounts the home's claim
POD_FIELDS = {
    "STN_NAMESPACE": "metadata.namespace",
    "STN_POD_NAME": "metadata.name",
    "STN_POD_UID": "metadata.uid",
}
_KFP_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")  # what the kfp compiler keeps unchanged


def check_step_config(config, mounted_home=None):
    """Raise ValueError unless the step's pod can run `config`: a pipeline name KFP keeps as
    it is, a home and data root that are absolute paths (where the volumes are mounted), the
    home `mounted_home` if given, and Kubernetes workers that see the home's claim where the
    step does."""
    if not _KFP_NAME.fullmatch(config.pipeline_name):
        raise ValueError(
            "config field 'pipeline_name' must be 1 to 128 lowercase letters, digits and '-', "
            f"starting with a letter or digit, for Kubeflow; got {config.pipeline_name!r}"
        )
    for name in ("home", "data_root"):
        path = getattr(config, name)
        if path is not None and not os.path.isabs(path):
            raise ValueError(
                f"config field {name!r} must be an absolute path in the step's pod, where the "
                f"volumes are mounted; got {path!r}"
            )
    if mounted_home and os.path.normpath(config.home_dir) != os.path.normpath(mounted_home):
        raise ValueError(
            f"config field 'home' must be {mounted_home}, where the package mounts the claims "
            f"{HOME_CLAIM!r} and {MODELS_CLAIM!r}; got {config.home!r} (compile a package for "
            "another home)"
        )
    workers = config.multiworker_config()
    if workers.backend == "kubernetes":
        mounted = (workers.kubernetes.pvc, os.path.normpath(workers.kubernetes.mount_path))
        if mounted != (HOME_CLAIM, os.path.normpath(config.home_dir)):
            raise ValueError(
                "config field 'multiworker': the Kubernetes workers must mount the claim "
                f"{HOME_CLAIM!r} at the home {config.home_dir}, where the step mounts it; they "
                f"mount {mounted[0]!r} at {mounted[1]}"
            )


def config_text(config):
    """`config` as config-file text that `load_config` reads back to the same config.

    One line of YAML in flow style, ASCII with escapes: the kfp compiler copies defaults into a
    comment line of the package, where a line break would end the comment.
    """
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    values["beam_args"] = list(config.beam_args)
    text = yaml.dump(
        values, Dumper=ConfigDumper, default_flow_style=True, width=math.inf, allow_unicode=False
    )
    return text.strip()


def compile_watch_package(config, output_path, image=None):
    """Write the one-step KFP package of `config` to `output_path` (.yaml/.yml); return it.

    `image` defaults to `config.container_image`.
    """
    from kfp import compiler, dsl, kubernetes

    check_package_path(output_path)
    check_step_config(config)
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
        task.set_env_variable(HOME_ENV, config.home_dir)
        # k8s/base/retrain-cronjob.yaml's requests and limits
        task.set_cpu_request("2").set_cpu_limit("4")
        task.set_memory_request("6Gi").set_memory_limit("12Gi")
        kubernetes.set_timeout(task, DEADLINE_S)
        kubernetes.mount_pvc(task, HOME_CLAIM, config.home_dir)
        kubernetes.mount_pvc(task, MODELS_CLAIM, os.path.join(config.home_dir, "serving"))
        for name, field_path in POD_FIELDS.items():
            kubernetes.use_field_path_as_env(task, name, field_path)

    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    compiler.Compiler().compile(watch_once, str(output_path))
    return output_path
