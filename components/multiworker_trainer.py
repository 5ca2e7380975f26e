"""A TFX Trainer that runs the Trainer module's `run_fn` on N workers (MultiWorkerMirroredStrategy).

`MultiWorkerTrainer` is the stock `tfx.components.Trainer` (same spec: inputs, outputs,
exec properties, so Evaluator, Resolver and Pusher work unchanged) with another executor.
The executor writes a worker spec (artifacts and exec properties) into the model run dir,
starts the workers on the configured backend, waits for them, and checks that the chief
exported the model, as the stock executor does.

The Trainer module's `run_fn` should, for multi-worker training:
- take the strategy from `tf.distribute.get_strategy()` (each worker runs `run_fn` inside a
  `MultiWorkerMirroredStrategy` scope), build and compile the model in `strategy.scope()`,
  use global batch = per-replica batch x `strategy.num_replicas_in_sync`;
- read its shard with `stn_model.input_shards.worker_records` inside
  `strategy.distribute_datasets_from_function`;
- add `tf_keras.callbacks.BackupAndRestore(os.path.join(fn_args.model_run_dir, "backup"))`
  (that is where the launcher looks for the step it resumes from);
- call `model.save(fn_args.serving_model_dir)` on every worker: only the chief's
  `serving_model_dir` is the real one, the others point at temporary directories.

A `warm_start_model` in `custom_config` is copied into the model run dir first, and the workers
get the copy: they share the pipeline root with the executor, not its other volumes (on
Kubernetes, the pushed models are another claim, which the workers do not mount).
"""

import hashlib
import json
import os
from typing import Any

from tfx import types
from tfx.components import Trainer
from tfx.components.trainer.executor import GenericExecutor
from tfx.dsl.components.base import executor_spec
from tfx.dsl.io import fileio
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import io_utils, json_utils

from components.multiworker_config import CONFIG_KEY, MultiWorkerConfig

BACKUP_DIR_NAME = "backup"
WARM_START_KEY = "warm_start_model"
WARM_START_DIR_NAME = "warm_start"


def worker_job_name(model_run_dir: str) -> str:
    """A DNS-1123 name for this execution's workers, stable for one model run dir."""
    digest = hashlib.sha256(model_run_dir.encode()).hexdigest()[:10]
    return f"stn-trainer-{digest}"


class MultiWorkerExecutor(GenericExecutor):
    """Runs `run_fn` on the workers that `custom_config["multiworker"]` describes."""

    def Do(
        self,
        input_dict: dict[str, list[types.Artifact]],
        output_dict: dict[str, list[types.Artifact]],
        exec_properties: dict[str, Any],
    ) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        config, worker_properties = split_config(exec_properties)
        fn_args = self._GetFnArgs(input_dict, output_dict, worker_properties)
        worker_properties = share_warm_start(worker_properties, fn_args.model_run_dir)
        spec_path = os.path.join(fn_args.model_run_dir, "multiworker_spec.json")
        spec = {
            "input_dict": artifact_utils.jsonify_artifact_dict(input_dict),
            "output_dict": artifact_utils.jsonify_artifact_dict(output_dict),
            "exec_properties": worker_properties,
            "mixed_precision": config.mixed_precision,
        }
        fileio.makedirs(fn_args.model_run_dir)
        with fileio.open(spec_path, "w") as f:
            f.write(json.dumps(spec))

        if config.backend == "local":
            from components.worker_launcher import run_local

            backup_dir = os.path.join(fn_args.model_run_dir, BACKUP_DIR_NAME)
            run_local(spec_path, config.num_workers, config.max_restarts, backup_dir)
        else:
            from components.k8s_backend import run_on_kubernetes

            run_on_kubernetes(worker_job_name(fn_args.model_run_dir), spec_path, config)

        if not fileio.exists(fn_args.serving_model_dir):
            raise RuntimeError(
                f"the chief worker did not export a model to {fn_args.serving_model_dir}"
            )


def split_config(exec_properties: dict[str, Any]) -> tuple[MultiWorkerConfig, dict[str, Any]]:
    """The multi-worker settings, and the exec properties without them (for `run_fn`)."""
    key = standard_component_specs.CUSTOM_CONFIG_KEY
    custom_config = json_utils.loads(exec_properties.get(key) or "null") or {}
    if CONFIG_KEY not in custom_config:
        raise ValueError(f"custom_config lacks the {CONFIG_KEY!r} settings of the workers")
    config = MultiWorkerConfig.from_dict(custom_config.pop(CONFIG_KEY))
    worker_properties = dict(exec_properties)
    worker_properties[key] = json_utils.dumps(custom_config or None)
    return config, worker_properties


def share_warm_start(worker_properties: dict[str, Any], model_run_dir: str) -> dict[str, Any]:
    """The exec properties with custom_config's `warm_start_model` copied into `model_run_dir`
    (the workers read the copy); unchanged when there is none, or none this process can see."""
    key = standard_component_specs.CUSTOM_CONFIG_KEY
    custom_config = json_utils.loads(worker_properties.get(key) or "null") or {}
    source = custom_config.get(WARM_START_KEY)
    if not source or not fileio.isdir(source):
        return worker_properties
    copy = os.path.join(model_run_dir, WARM_START_DIR_NAME)
    io_utils.copy_dir(source, copy)
    return {**worker_properties, key: json_utils.dumps({**custom_config, WARM_START_KEY: copy})}


class MultiWorkerTrainer(Trainer):
    """`tfx.components.Trainer` whose `run_fn` runs on `config.num_workers` workers.

    Takes the stock Trainer's arguments, plus `config` (a `MultiWorkerConfig`).
    """

    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(MultiWorkerExecutor)

    def __init__(self, config: MultiWorkerConfig, custom_config=None, **trainer_kwargs):
        if custom_config is not None and not isinstance(custom_config, dict):
            raise ValueError("custom_config must be a dict for MultiWorkerTrainer")
        if CONFIG_KEY in (custom_config or {}):
            raise ValueError(f"custom_config key {CONFIG_KEY!r} is reserved for the workers")
        merged = {**(custom_config or {}), CONFIG_KEY: config.to_dict()}
        super().__init__(custom_config=merged, **trainer_kwargs)
