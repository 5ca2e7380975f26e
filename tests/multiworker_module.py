"""A tiny Trainer module for the multi-worker tests: a small dense classifier on small PNGs.

It reads examples the way the project's Trainer module does (tf.Examples with an encoded PNG
`image` and an int64 `label`, gzipped TFRecords) and follows the multi-worker contract of
`components.multiworker_trainer`. For the tests it also writes, per worker, the loss history
and the digests of the images in its shard into the model run dir, prints the step training
starts at, and can sleep after each step (`custom_config["step_delay_s"]`) so a test can kill
a worker mid-training.
"""

import hashlib
import json
import os
import time

import tensorflow as tf
import tf_keras as keras

from stn_model.input_shards import worker_records

IMAGE_SIZE = 12
NUM_CLASSES = 10


def _parse(record):
    features = tf.io.parse_single_example(
        record,
        {
            "image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64),
        },
    )
    image = tf.image.convert_image_dtype(
        tf.io.decode_png(features["image"], channels=1), tf.float32
    )
    image.set_shape([IMAGE_SIZE, IMAGE_SIZE, 1])
    return image, features["label"]


class _StepReport(keras.callbacks.Callback):
    def __init__(self, delay_s):
        super().__init__()
        self.delay_s = delay_s

    def on_train_begin(self, logs=None):
        print(f"training starts at step {int(self.model.optimizer.iterations.numpy())}", flush=True)

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.delay_s)


def _worker_of(strategy):
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec() if resolver else None
    if not spec or not spec.jobs:
        return 0, 1
    return resolver.task_id, spec.num_tasks("worker")


def run_fn(fn_args):
    config = fn_args.custom_config or {}
    strategy = tf.distribute.get_strategy()
    worker, num_workers = _worker_of(strategy)
    global_batch = config.get("per_replica_batch", 8) * strategy.num_replicas_in_sync

    def dataset_fn(context):
        batch = context.get_per_replica_batch_size(global_batch)
        records = worker_records(fn_args.train_files, context)
        return records.map(_parse).batch(batch, drop_remainder=True).repeat()

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    keras.utils.set_random_seed(config.get("seed", 0))
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.layers.Flatten(input_shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(NUM_CLASSES, dtype="float32"),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(config.get("learning_rate", 0.5)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    epochs = config.get("epochs", 2)
    backup = keras.callbacks.BackupAndRestore(
        os.path.join(fn_args.model_run_dir, "backup"), save_freq=config.get("save_freq", "epoch")
    )
    history = model.fit(
        dataset,
        epochs=epochs,
        steps_per_epoch=fn_args.train_steps // epochs,
        callbacks=[backup, _StepReport(config.get("step_delay_s", 0.0))],
        verbose=0,
    )

    shard = worker_records(fn_args.train_files, tf.distribute.InputContext(num_workers, worker))
    digests = [hashlib.sha1(_parse(r)[0].numpy().tobytes()).hexdigest() for r in shard]
    with open(os.path.join(fn_args.model_run_dir, f"worker-{worker}.json"), "w") as f:
        json.dump({"loss": history.history["loss"], "shard": digests}, f)
    model.save(fn_args.serving_model_dir)
