"""One training worker: `python -m components.multiworker_worker SPEC [--cluster H] [--index I]`.

SPEC is the JSON file the multi-worker executor wrote (the Trainer's input and output
artifacts and exec properties). The worker rebuilds the Trainer's `fn_args` exactly as TFX's
GenericExecutor does and calls the Trainer module's `run_fn` inside the scope of a
`tf.distribute.MultiWorkerMirroredStrategy` (so `run_fn` takes it from
`tf.distribute.get_strategy()`), under `TF_CONFIG`:

- `--cluster host:port,host:port,...` with `--index` (default: the Indexed Job's
  `JOB_COMPLETION_INDEX`) sets `TF_CONFIG`; without `--cluster`, `TF_CONFIG` must already be
  set (a Kubeflow TFJob sets it).
- Only the chief (worker 0, or the task of type `chief`) keeps `fn_args.serving_model_dir`;
  the others get a temporary directory, removed afterwards, because Keras saves a
  MultiWorkerMirroredStrategy model collectively: every worker must call `save`.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

os.environ["TF_USE_LEGACY_KERAS"] = "1"

log = logging.getLogger("multiworker_worker")


def tf_config_for(hosts: list[str], index: int) -> dict:
    """The `TF_CONFIG` of worker `index` in a cluster of `hosts` (worker 0 is the chief)."""
    if not 0 <= index < len(hosts):
        raise ValueError(f"worker index {index} is outside the cluster of {len(hosts)} workers")
    return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}


def worker_index(index: int | None, environ) -> int:
    """`--index`, else the Indexed Job's `JOB_COMPLETION_INDEX`."""
    if index is not None:
        return index
    value = environ.get("JOB_COMPLETION_INDEX")
    if value is None or not value.isdigit():
        raise ValueError(
            "--cluster needs this worker's index: pass --index or set JOB_COMPLETION_INDEX "
            f"(an Indexed Job sets it), got JOB_COMPLETION_INDEX={value!r}"
        )
    return int(value)


def task_of(tf_config: dict) -> tuple[int, int, bool]:
    """(ordinal, number of workers, is chief) of this task; the chief task, if any, is 0."""
    cluster = tf_config.get("cluster") or {}
    task = tf_config.get("task") or {}
    chiefs = len(cluster.get("chief", []))
    total = chiefs + len(cluster.get("worker", []))
    if total == 0:
        return 0, 1, True
    task_type, index = task.get("type"), int(task.get("index", 0))
    if task_type == "chief":
        return 0, total, True
    if task_type != "worker":
        raise ValueError(f"TF_CONFIG task type must be 'chief' or 'worker', got {task_type!r}")
    ordinal = chiefs + index
    return ordinal, total, ordinal == 0


def _read_spec(path: str) -> dict:
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the worker spec {path}: {e}") from e
    missing = {"input_dict", "output_dict", "exec_properties"} - set(spec)
    if missing:
        raise ValueError(f"worker spec {path} lacks {sorted(missing)}")
    return spec


def run_worker(spec_path: str) -> None:
    """Rebuilds fn_args from the spec and runs the Trainer module's run_fn in this process,
    inside the scope of a MultiWorkerMirroredStrategy built from `TF_CONFIG`."""
    spec = _read_spec(spec_path)
    ordinal, total, is_chief = task_of(json.loads(os.environ.get("TF_CONFIG") or "{}"))
    log.info("worker %d of %d (%s)", ordinal, total, "chief" if is_chief else "non-chief")

    import tensorflow as tf
    from tfx.components.trainer.executor import GenericExecutor
    from tfx.components.util import udf_utils
    from tfx.types import artifact_utils

    from stn_model.keras_setup import skip_autograph_of_tf_keras

    skip_autograph_of_tf_keras()
    if spec.get("mixed_precision"):
        _use_mixed_precision()
    # Created before anything else touches the TensorFlow runtime, as collectives require.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    log.info("%d replicas in sync", strategy.num_replicas_in_sync)

    input_dict = artifact_utils.parse_artifact_dict(spec["input_dict"])
    output_dict = artifact_utils.parse_artifact_dict(spec["output_dict"])
    exec_properties = spec["exec_properties"]
    fn_args = GenericExecutor()._GetFnArgs(input_dict, output_dict, exec_properties)
    scratch = None
    if not is_chief:
        scratch = tempfile.mkdtemp(prefix=f"worker-{ordinal}-model-")
        fn_args.serving_model_dir = os.path.join(scratch, "serving_model_dir")
    run_fn = udf_utils.get_fn(exec_properties, "run_fn")
    try:
        with strategy.scope():
            run_fn(fn_args)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("worker %d finished", ordinal)


def _use_mixed_precision() -> None:
    import tensorflow as tf
    import tf_keras as keras

    if not tf.config.list_physical_devices("GPU"):
        log.warning("mixed_float16 requested but this worker sees no GPU; it will run slowly")
    keras.mixed_precision.set_global_policy("mixed_float16")
    log.info("Keras policy: %s", keras.mixed_precision.global_policy().name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="the worker spec JSON written by the executor")
    parser.add_argument("--cluster", help="comma-separated host:port of all workers")
    parser.add_argument("--index", type=int, help="this worker's index in --cluster")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "apache_beam", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.cluster:
        index = worker_index(args.index, os.environ)
        config = tf_config_for(args.cluster.split(","), index)
        os.environ["TF_CONFIG"] = json.dumps(config)
    run_worker(args.spec)
    return 0


if __name__ == "__main__":
    code = main()
    # Skip TensorFlow's exit handlers: a worker whose peers have already exited otherwise
    # waits for the collective runtime's heartbeat to time out (16 s measured) before exiting.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
