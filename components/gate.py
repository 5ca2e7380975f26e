"""The anomaly gate: stops the pipeline before training when the data failed validation.

`AnomalyGate` reads ExampleValidator's anomalies and StatisticsGen's statistics and raises
`DataValidationError`, listing every problem in words, when ExampleValidator found anomalies
or the statistics show what TFDV's schema cannot express: a split without examples, a label
the model has no output for (at or above `num_classes`), or a train split whose labels are all
one class or lack one of the model's classes (with the curated schema, whose categorical label
makes the statistics count every class), or a split whose images are all the same; and, from
the examples, an eval image that is also a train image (leakage). The pipeline makes the
trainer depend on the gate (`trainer.add_upstream_node(gate)`), so nothing downstream runs
after a failure.
"""

import hashlib
import os

import tensorflow as tf
from tensorflow_metadata.proto.v0 import anomalies_pb2, statistics_pb2
from tfx.components.example_validator.executor import DEFAULT_FILE_NAME as ANOMALIES_FILE
from tfx.components.statistics_gen.stats_artifact_utils import load_statistics
from tfx.dsl.component.experimental.annotations import InputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.dsl.io import fileio
from tfx.types import artifact_utils
from tfx.types.standard_artifacts import ExampleAnomalies, Examples, ExampleStatistics

IMAGE_FEATURE = "image"  # the data contract's encoded image


class DataValidationError(RuntimeError):
    """The data failed validation; its message lists every problem."""


def anomaly_problems(anomalies, split):
    """One sentence per anomaly (and per reason) in an `anomalies_pb2.Anomalies` of `split`."""
    problems = []
    for feature, info in sorted(anomalies.anomaly_info.items()):
        problems.extend(_describe(f"split '{split}', feature '{feature}'", info))
    if anomalies.HasField("dataset_anomaly_info"):
        problems.extend(_describe(f"split '{split}'", anomalies.dataset_anomaly_info))
    return problems


def _describe(where, info):
    """One sentence per reason of an AnomalyInfo, falling back to its overall description."""
    sentences = []
    for reason in info.reason or [anomalies_pb2.AnomalyInfo.Reason()]:
        short = reason.short_description or info.short_description or "anomaly"
        kind = f" [{anomalies_pb2.AnomalyInfo.Type.Name(reason.type)}]" if reason.type else ""
        sentences.append(f"{where}: {short}: {reason.description or info.description}{kind}")
    return sentences


def statistics_problems(statistics, split, label_feature, check_classes, num_classes=None):
    """Problems the schema cannot express, from one split's `DatasetFeatureStatistics`.

    Its images must not all be one; labels must be below `num_classes`, the model's outputs
    (None: not checked); with `check_classes` the split must hold at least two classes, and
    every one below `num_classes` when the statistics count them.
    """
    if statistics.num_examples == 0:
        # An empty split folder stops ImageExampleGen; here every input was skipped as bad.
        return [
            f"split '{split}' holds no examples (were all its inputs skipped as bad, or empty?)"
        ]
    return _image_problems(statistics, split) + _label_problems(
        statistics, split, label_feature, check_classes, num_classes
    )


def _image_problems(statistics, split):
    """A problem when every example of a split holds the same image bytes (a broken export:
    every image black, or one file copied), which TFDV's count of distinct values shows."""
    image = _feature_statistics(statistics, IMAGE_FEATURE)
    if image is None or statistics.num_examples < 2 or image.string_stats.unique != 1:
        return []
    return [
        f"split '{split}' holds one image {statistics.num_examples:,} times: every "
        f"'{IMAGE_FEATURE}' is the same (all black, or one file copied?)"
    ]


def _label_problems(statistics, split, label_feature, check_classes, num_classes):
    """The label checks of `statistics_problems`."""
    if not check_classes and num_classes is None:
        return []
    label = _feature_statistics(statistics, label_feature)
    if label is None:
        return [f"split '{split}' has no statistics for the label feature '{label_feature}'"]
    classes = _classes(label)
    low, high = (
        (min(classes), max(classes)) if classes else (label.num_stats.min, label.num_stats.max)
    )
    problems = []
    if num_classes is not None and high >= num_classes:
        problems.append(
            f"split '{split}' has '{label_feature}' {high:g}, but the model has {num_classes} "
            f"classes (0 to {num_classes - 1}); set num_classes or relabel the data"
        )
    if check_classes and low == high:
        problems.append(
            f"split '{split}' holds a single class: every '{label_feature}' is "
            f"{low:g}; a classifier needs examples of at least two classes"
        )
    elif check_classes and classes and num_classes is not None:
        missing = sorted(set(range(num_classes)) - classes)
        if missing:
            problems.append(
                f"split '{split}' has no examples of '{label_feature}' "
                f"{', '.join(map(str, missing))}: the model would never learn "
                f"{'that class' if len(missing) == 1 else 'those classes'}"
            )
    return problems


def _classes(label):
    """The set of labels a categorical label's statistics count, or None for numeric ones
    (a schema without `is_categorical` gives only their minimum and maximum)."""
    if label.WhichOneof("stats") != "string_stats":
        return None
    return {int(bucket.label) for bucket in label.string_stats.rank_histogram.buckets}


def _feature_statistics(statistics, name):
    """The `FeatureNameStatistics` of feature `name`, or None."""
    for feature in statistics.features:
        if feature.path.step[:] == [name] or feature.name == name:
            return feature
    return None


def leak_problems(examples, train_split="train"):
    """One problem per split that holds images the train split holds too, byte for byte (the
    model is evaluated on images it trained on, so its accuracy is overstated)."""
    splits = artifact_utils.decode_split_names(examples.split_names)
    if train_split not in splits:
        return []
    trained = set(_image_digests(examples, train_split))
    problems = []
    for split in splits:
        if split == train_split:
            continue
        shared = sum(digest in trained for digest in _image_digests(examples, split))
        if shared:
            problems.append(
                f"split '{split}' holds {shared:,} image(s) that split '{train_split}' holds "
                "too (identical files): its accuracy would count images the model trained on"
            )
    return problems


def _image_digests(examples, split):
    """The SHA-256 of every example's image in one split of an Examples artifact."""
    folder = artifact_utils.get_split_uri([examples], split)
    files = fileio.glob(os.path.join(folder, "*.gz"))
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator():
        values = tf.train.Example.FromString(record).features.feature[IMAGE_FEATURE].bytes_list
        yield hashlib.sha256(b"".join(values.value)).digest()


def gate_problems(
    anomalies,
    statistics,
    label_feature="label",
    train_split="train",
    num_classes=None,
    examples=None,
):
    """Every problem the gate reports, given the artifacts (`examples`: None, not checked for
    images shared between splits)."""
    problems = [] if examples is None else leak_problems(examples, train_split)
    for split in artifact_utils.decode_split_names(statistics.split_names):
        datasets = load_statistics(statistics, split).proto().datasets
        split_stats = datasets[0] if datasets else statistics_pb2.DatasetFeatureStatistics()
        problems.extend(
            statistics_problems(
                split_stats, split, label_feature, split == train_split, num_classes
            )
        )
    for split in artifact_utils.decode_split_names(anomalies.split_names):
        path = os.path.join(artifact_utils.get_split_uri([anomalies], split), ANOMALIES_FILE)
        with fileio.open(path, "rb") as handle:
            problems.extend(
                anomaly_problems(anomalies_pb2.Anomalies.FromString(handle.read()), split)
            )
    return problems


@component
def AnomalyGate(
    anomalies: InputArtifact[ExampleAnomalies],
    statistics: InputArtifact[ExampleStatistics],
    examples: InputArtifact[Examples],
    label_feature: Parameter[str] = "label",
    train_split: Parameter[str] = "train",
    num_classes: Parameter[int] = 10,
):
    """Raises DataValidationError listing every problem when the data failed validation."""
    problems = gate_problems(
        anomalies, statistics, label_feature, train_split, num_classes, examples
    )
    if problems:
        raise DataValidationError(
            f"The data failed validation ({len(problems)} problem(s)); nothing downstream runs:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
        )
