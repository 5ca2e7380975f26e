"""The TFX Trainer module: `run_fn(fn_args)` trains the classifier and exports the SavedModel.

Reads the examples' gzipped TFRecord files with tf.data (features ``image``: encoded PNG/JPEG
bytes, ``label``: int64), decodes and normalizes the images inside the model graph (the
`stn_model.serving.DecodeImages` layer, the same preprocessing the serving signatures use),
trains the model named by ``custom_config["model"]`` (an ST-CNN, or the plain ``cnn`` as a
baseline) with Adam on a warmed-up cosine schedule (`learning_rate_schedule`), writes
TensorBoard logs to ``fn_args.model_run_dir`` and exports the signatures of `stn_model.serving`
to ``fn_args.serving_model_dir``.

Ready for multi-worker training (the contract of `components.multiworker_trainer`): `run_fn`
uses the distribution strategy in scope (or the one passed in), reads each worker's shard with
`stn_model.input_shards.worker_records`, builds and compiles the model inside
``strategy.scope()``, uses global batch = per-replica batch x replicas, backs up every epoch
(``BackupAndRestore``), and only the chief writes TensorBoard logs and the export.
"""

import dataclasses
import hashlib
import logging
import math
import os
import pathlib
import shutil
import tempfile

import tensorflow as tf
import tf_keras as keras

from stn_model import serving
from stn_model.checks import is_int
from stn_model.input_shards import list_files, worker_records
from stn_model.keras_setup import skip_autograph_of_tf_keras

logger = logging.getLogger(__name__)

LABEL_FEATURE = "label"


def _is_number(value):
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_POSITIVE_INT = (lambda v: is_int(v, 1), "an integer >= 1")
# Every TrainingOptions field: (whether a value is accepted, what the error says it must be).
# The equivariance angle has the range `equivariance.RotationEquivariance` accepts.
_OPTION_CHECKS = {
    "model": (lambda v: isinstance(v, str) and bool(v), "a model name"),
    "epochs": _POSITIVE_INT,
    "batch_size": _POSITIVE_INT,
    "learning_rate": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "image_size": _POSITIVE_INT,
    "num_classes": _POSITIVE_INT,
    "seed": (lambda v: is_int(v, 0) and v < 2**32, "an integer in [0, 2**32)"),
    "st_iterations": _POSITIVE_INT,
    "full_resolution_localization": (lambda v: isinstance(v, bool), "true or false"),
    "localization_hidden_units": (lambda v: v is None or is_int(v, 1), "an integer >= 1 or null"),
    "equivariance_weight": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "equivariance_angle": (lambda v: _is_number(v) and 0 < v <= 180, "a number in (0, 180]"),
    "warm_start_model": (lambda v: v is None or isinstance(v, str), "a SavedModel path or null"),
    "shuffle_buffer": _POSITIVE_INT,
    "code_digest": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """What ``custom_config`` may set (all optional)."""

    model: str = "st_cnn_affine"
    epochs: int = 8
    batch_size: int = 128  # per replica
    learning_rate: float = 2e-3
    image_size: int = 42
    num_classes: int = 10
    seed: int = 1
    st_iterations: int = 1
    full_resolution_localization: bool = False
    localization_hidden_units: int | None = None
    equivariance_weight: float = 0.0  # > 0: train with the rotation equivariance loss
    equivariance_angle: float = 45.0
    warm_start_model: str | None = None  # a pushed SavedModel to take the initial weights from
    # Examples come grouped by label (ImageExampleGen reads the label folders in turn), so the
    # buffer must hold the whole train split for batches to mix the classes: up to this many.
    shuffle_buffer: int = 200_000
    # `training_code_digest()`: unused by training; it keys TFX's cache of the Trainer.
    code_digest: str | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            accepts, requirement = _OPTION_CHECKS[field.name]
            value = getattr(self, field.name)
            if not accepts(value):
                raise ValueError(
                    f"custom_config[{field.name!r}] must be {requirement}, got {value!r}"
                )

    @classmethod
    def from_custom_config(cls, custom_config):
        custom_config = dict(custom_config or {})
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(custom_config) - known)
        if unknown:
            raise ValueError(f"custom_config has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**custom_config)


def training_code_digest(package_dir=pathlib.Path(__file__).parent):
    """SHA-256 of the model package's sources (.py and .cc, by relative path and content).

    TFX caches a Trainer on its exec properties, which name `run_fn` by its import path only;
    with this digest among them, a change to the training code trains again."""
    digest = hashlib.sha256()
    for path in sorted(p for p in package_dir.rglob("*") if p.suffix in (".py", ".cc")):
        digest.update(path.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def run_fn(fn_args, strategy=None):
    """TFX Trainer entry point (GenericExecutor); see the module docstring."""
    skip_autograph_of_tf_keras()
    options = TrainingOptions.from_custom_config(fn_args.custom_config)
    strategy = strategy or tf.distribute.get_strategy()
    global_batch = options.batch_size * strategy.num_replicas_in_sync
    chief = is_chief(getattr(strategy, "cluster_resolver", None))
    keras.utils.set_random_seed(options.seed)

    num_train = count_records(fn_args.train_files)
    if fn_args.train_steps:
        epochs, steps_per_epoch = split_steps(fn_args.train_steps, num_train, global_batch)
        if epochs * steps_per_epoch != fn_args.train_steps:
            logger.info(
                "train_steps %d rounded up to %d epochs x %d steps",
                fn_args.train_steps,
                epochs,
                steps_per_epoch,
            )
    else:
        epochs, steps_per_epoch = options.epochs, max(1, math.ceil(num_train / global_batch))
    shuffle_buffer = min(num_train, options.shuffle_buffer)
    train_data = strategy.distribute_datasets_from_function(
        lambda context: read_examples(
            fn_args.train_files, global_batch, context, shuffle_buffer, options.seed
        ).repeat()
    )
    validation_steps = fn_args.eval_steps
    if distributes_datasets(strategy) and not validation_steps:
        # Keras needs a step count for a distributed dataset; every replica runs as many.
        validation_steps = max(1, count_records(fn_args.eval_files) // global_batch)

    def eval_batches(context):
        batches = read_examples(fn_args.eval_files, global_batch, context)
        # A step count beyond the split must not run it dry: Keras would skip every later
        # epoch's validation without a word.
        return batches.repeat() if validation_steps else batches

    eval_data = strategy.distribute_datasets_from_function(eval_batches)

    with strategy.scope():
        model = _build(options)
        if options.warm_start_model:
            warm_start(model, options.warm_start_model)
        fitted = _regularized(model, options)
        trainable = serving.with_decoder(fitted)
        schedule = learning_rate_schedule(options.learning_rate, epochs * steps_per_epoch)
        trainable.compile(
            optimizer=keras.optimizers.Adam(schedule),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )

    # BackupAndRestore: a restarted multi-worker group resumes from the last epoch.
    backup = keras.callbacks.BackupAndRestore(os.path.join(fn_args.model_run_dir, "backup"))
    callbacks = [EpochLog(epochs), backup]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=fn_args.model_run_dir))
    logger.info(
        "training %s: %d train examples, %d epochs x %d steps, global batch %d on %d replica(s)",
        fitted.name,
        num_train,
        epochs,
        steps_per_epoch,
        global_batch,
        strategy.num_replicas_in_sync,
    )
    trainable.fit(
        train_data,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=eval_data,
        validation_steps=validation_steps,
        callbacks=callbacks,
        verbose=0,
    )
    # Every worker takes part in saving (variables are read collectively); only the chief
    # writes to serving_model_dir.
    export_dir = fn_args.serving_model_dir if chief else tempfile.mkdtemp(prefix="stn-export-")
    serving.export_saved_model(model, export_dir, transformer=_transformer(model, options))
    if not chief:
        shutil.rmtree(export_dir, ignore_errors=True)


def learning_rate_schedule(peak, total_steps):
    """A linear warm-up from 0 to `peak` over the first tenth of `total_steps` (none under 10
    steps), then a cosine decay to 5% of `peak`.

    Without the warm-up, Adam's first full-size steps could drive an ST model's transform off
    the image within about ten steps: the rectified images are then black, no gradient reaches
    the transform again, and the model stays at chance. On the default data set that happened
    for 3 of 20 shuffles of its examples; with the warm-up, for none.
    """
    warmup = total_steps // 10
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else peak,
        decay_steps=total_steps - warmup,
        alpha=0.05,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


def split_steps(train_steps, num_train, global_batch):
    """(epochs, steps per epoch) for `train_steps` steps in whole epochs of about one pass over
    `num_train` examples each: the total rounds up to a multiple of the epochs, by fewer steps
    than there are epochs (checkpoints, validation and the log come once an epoch)."""
    epochs = math.ceil(train_steps / max(1, math.ceil(num_train / global_batch)))
    return epochs, math.ceil(train_steps / epochs)


def warm_start(model, saved_model_dir):
    """Load `model`'s weights from a pushed SavedModel of the same model; on a mismatch (another
    model type, or no such model) log a warning and keep the fresh weights."""
    fresh = model.get_weights()
    checkpoint = tf.train.Checkpoint(weights=list(model.variables))
    path = os.path.join(saved_model_dir, "variables", "variables")
    try:
        checkpoint.read(path).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        model.set_weights(fresh)  # undo whatever part of the checkpoint did load
        logger.warning(
            "cannot warm-start from %s (%s: %s); training from scratch",
            saved_model_dir,
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )
        return False
    logger.info("warm-started from %s", saved_model_dir)
    return True


def _build(options):
    from stn_model.models import build_model

    return build_model(
        options.model,
        input_shape=(options.image_size, options.image_size, 1),
        num_classes=options.num_classes,
        full_resolution_localization=options.full_resolution_localization,
        localization_hidden_units=options.localization_hidden_units,
        st_iterations=options.st_iterations,
    )


def _regularized(model, options):
    """`model`, or when `equivariance_weight` > 0 the model ``<name>_equivariant`` that trains
    it with the rotation equivariance loss (same weights; the export is `model`)."""
    if not options.equivariance_weight:
        return model
    from stn_model.equivariance import with_rotation_equivariance

    return with_rotation_equivariance(
        model, options.equivariance_weight, options.equivariance_angle
    )


def _transformer(model, options):
    """The SpatialTransformer of an ST model, None for the others."""
    from stn_model.models import find_spatial_transformer

    return find_spatial_transformer(model) if options.model.startswith("st_") else None


def distributes_datasets(strategy):
    """Whether `strategy` hands Keras distributed datasets: any strategy but the default one,
    with one replica too (a lone MultiWorkerMirroredStrategy worker)."""
    return tf.distribute.has_strategy() or strategy is not tf.distribute.get_strategy()


def is_chief(cluster_resolver):
    """Whether this process exports: the chief, worker 0 when there is no chief, or a lone one."""
    if cluster_resolver is None or not cluster_resolver.cluster_spec().as_dict():
        return True
    jobs = cluster_resolver.cluster_spec().as_dict()
    if cluster_resolver.task_type == "chief":
        return True
    return (
        cluster_resolver.task_type == "worker"
        and cluster_resolver.task_id == 0
        and "chief" not in jobs
    )


def count_records(file_patterns):
    """How many tf.Examples the gzipped TFRecord files of `file_patterns` hold."""
    records = tf.data.TFRecordDataset(list_files(file_patterns), compression_type="GZIP")
    return int(records.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def read_examples(file_patterns, global_batch, input_context=None, shuffle=0, seed=None):
    """This worker's batches of ({"images": encoded bytes [B]}, labels int64 [B]).

    Reads the gzipped tf.Examples of `file_patterns`; with an `input_context` (from
    `strategy.distribute_datasets_from_function`) only this worker's shard, in batches of the
    per-replica size.
    """
    context = input_context or tf.distribute.InputContext()
    spec = {
        serving.IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string),
        LABEL_FEATURE: tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(serialized):
        features = tf.io.parse_example(serialized, spec)
        return {serving.IMAGES_KEY: features[serving.IMAGE_FEATURE]}, features[LABEL_FEATURE]

    data = worker_records(file_patterns, context)
    if shuffle:
        data = data.shuffle(shuffle, seed=seed)
    data = data.batch(context.get_per_replica_batch_size(global_batch))
    return data.map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


class EpochLog(keras.callbacks.Callback):
    """Logs one line per epoch (loss, accuracy, eval accuracy) for the person watching."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        values = ", ".join(f"{key} {value:.4f}" for key, value in sorted(logs.items()))
        logger.info("epoch %d/%d: %s", epoch + 1, self.epochs, values)
