"""ImageExampleGen: folders of labelled PNG/JPEG images and TFRecords of tf.Examples -> Examples.

A file-based TFX ExampleGen (FileBasedExampleGen's spec, driver and split handling, so
`span-{SPAN}` patterns, RangeConfig and input fingerprints work as in any TFX ExampleGen)
with an executor that writes, for every image, a tf.Example with the data contract's features:
`image` (the encoded file, unchanged), `label` (int64), `variant` and `distortion` (bytes).

Every image is decoded and checked against the data set's shape. Bad files (not decodable,
another shape, no label) fail the run with one line per file, unless `max_bad_files` allows
skipping them; skipped files are logged and recorded on the output artifact
(`skipped_file_count`, `skipped_files`).
"""

import hashlib
import os

import apache_beam as beam
import tensorflow as tf
from absl import logging
from google.protobuf import json_format, struct_pb2
from tfx.components import FileBasedExampleGen
from tfx.components.example_gen import driver
from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
from tfx.dsl.components.base import executor_spec
from tfx.dsl.io import fileio
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

from components import image_listing
from components.image_decoding import format_shape, image_problem

DEFAULT_IMAGE_SHAPE = (42, 42, 1)
SKIPPED_COUNT_PROPERTY = "skipped_file_count"
SKIPPED_FILES_PROPERTY = "skipped_files"
_REJECTED = "rejected"
_REJECTS_DIR_KEY = "_rejects_dir"


def span_input_config(train_pattern="span-{SPAN}/train/*/*", eval_pattern="span-{SPAN}/eval/*/*"):
    """The data contract's input config: splits `train` and `eval` of the latest span."""
    return example_gen_pb2.Input(
        splits=[
            example_gen_pb2.Input.Split(name="train", pattern=train_pattern),
            example_gen_pb2.Input.Split(name="eval", pattern=eval_pattern),
        ]
    )


def ingest_config(image_shape=DEFAULT_IMAGE_SHAPE, max_bad_files=0, labels_file=None):
    """The executor's settings as the ExampleGen's CustomConfig (a Struct in its Any)."""
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(size, int) and size > 0 for size in shape):
        raise ValueError(f"image_shape must be 3 positive ints (height, width, channels): {shape}")
    if isinstance(max_bad_files, bool) or not isinstance(max_bad_files, int) or max_bad_files < 0:
        raise ValueError(f"max_bad_files must be an int >= 0, got {max_bad_files!r}")
    if labels_file is not None and (not labels_file or os.sep in labels_file):
        raise ValueError(f"labels_file must be a file name such as 'labels.csv': {labels_file!r}")
    settings = struct_pb2.Struct()
    settings.update(
        {"image_shape": list(shape), "max_bad_files": max_bad_files, "labels_file": labels_file}
    )
    config = example_gen_pb2.CustomConfig()
    config.custom_config.Pack(settings)
    return config


def ingest_settings(exec_properties):
    """(image shape, max bad files, labels file) from the exec properties' custom config."""
    config = example_gen_pb2.CustomConfig()
    text = exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY)
    if text:
        proto_utils.json_to_proto(text, config)
    settings = struct_pb2.Struct()
    if config.HasField("custom_config") and not config.custom_config.Unpack(settings):
        raise ValueError(f"custom_config must hold a google.protobuf.Struct: {text}")
    values = json_format.MessageToDict(settings)
    shape = tuple(int(size) for size in values.get("image_shape", DEFAULT_IMAGE_SHAPE))
    return shape, int(values.get("max_bad_files", 0)), values.get("labels_file")


def _example(image_bytes, label, variant, distortion):
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "variant": tf.train.Feature(bytes_list=tf.train.BytesList(value=[variant.encode()])),
        "distortion": tf.train.Feature(bytes_list=tf.train.BytesList(value=[distortion.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


class _ImageToExample(beam.DoFn):
    """ImageSource -> tf.Example, or a 'path problem' line on the rejected output."""

    def __init__(self, shape):
        self._shape = shape

    def process(self, source):
        problem = source.problem
        if problem is None:
            with fileio.open(source.path, "rb") as handle:
                data = handle.read()
            problem = image_problem(data, self._shape)
        if problem is not None:
            yield beam.pvalue.TaggedOutput(_REJECTED, f"{source.path} {problem}")
        else:
            yield _example(data, source.label, source.variant, source.distortion)


class _TFRecordToExamples(beam.DoFn):
    """TFRecord path -> its tf.Examples, completed with the contract's optional features."""

    def __init__(self, shape):
        self._shape = shape

    def process(self, path):
        compression = "GZIP" if path.lower().endswith(".gz") else ""
        records = tf.data.TFRecordDataset(path, compression_type=compression)
        try:
            for index, record in enumerate(records.as_numpy_iterator()):
                example, problem = self._check(record)
                if problem is not None:
                    yield beam.pvalue.TaggedOutput(_REJECTED, f"{path} record {index} {problem}")
                else:
                    yield example
        except tf.errors.DataLossError as error:
            yield beam.pvalue.TaggedOutput(
                _REJECTED, f"{path} is not a readable TFRecord file ({error.message})"
            )

    def _check(self, record):
        try:
            example = tf.train.Example.FromString(record)
        except Exception as error:  # protobuf raises DecodeError, a bare Exception subclass
            return None, f"is not a tf.Example ({error})"
        features = example.features.feature
        images = features["image"].bytes_list.value if "image" in features else []
        labels = features["label"].int64_list.value if "label" in features else []
        if len(images) != 1 or len(labels) != 1:
            return None, "needs exactly one bytes `image` and one int64 `label` value"
        problem = image_problem(images[0], self._shape)
        if problem is not None:
            return None, f"image {problem}"
        defaults = {
            "variant": image_listing.UNKNOWN_VARIANT,
            "distortion": image_listing.NO_DISTORTION,
        }
        for name, default in defaults.items():
            if name not in features:
                features[name].bytes_list.value.append(default.encode())
        return example, None


@beam.ptransform_fn
@beam.typehints.with_input_types(beam.Pipeline)
@beam.typehints.with_output_types(tf.train.Example)
def _InputToExamples(pipeline, exec_properties, split_pattern):
    """Reads one input split (images and/or TFRecords) into tf.Examples."""
    shape, _, labels_file = ingest_settings(exec_properties)
    input_base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
    images, tfrecords = image_listing.list_split(input_base, split_pattern, labels_file)
    logging.info(
        "ImageExampleGen: %s matches %d image and %d TFRecord files; image shape %s",
        split_pattern,
        len(images),
        len(tfrecords),
        format_shape(shape),
    )
    from_images = (
        pipeline
        | "ListImages" >> beam.Create(images, reshuffle=True)
        | "DecodeImages" >> beam.ParDo(_ImageToExample(shape)).with_outputs(_REJECTED, main="ok")
    )
    from_tfrecords = (
        pipeline
        | "ListTFRecords" >> beam.Create(tfrecords)
        | "ReadTFRecords"
        >> beam.ParDo(_TFRecordToExamples(shape)).with_outputs(_REJECTED, main="ok")
    )
    rejects_name = hashlib.sha256(split_pattern.encode()).hexdigest()[:16]
    _ = (
        (from_images[_REJECTED], from_tfrecords[_REJECTED])
        | "MergeRejected" >> beam.Flatten()
        | "WriteRejected"
        >> beam.io.WriteToText(
            os.path.join(exec_properties[_REJECTS_DIR_KEY], rejects_name),
            shard_name_template="",
        )
    )
    return (from_images.ok, from_tfrecords.ok) | "MergeExamples" >> beam.Flatten()


class Executor(BaseExampleGenExecutor):
    """ExampleGen executor for labelled image folders and TFRecords of tf.Examples."""

    def GetInputSourceToExamplePTransform(self):
        return _InputToExamples

    def Do(self, input_dict, output_dict, exec_properties):
        _, max_bad_files, _ = ingest_settings(exec_properties)
        rejects_dir = os.path.join(self._get_tmp_dir(), "rejected")
        fileio.makedirs(rejects_dir)
        super().Do(input_dict, output_dict, {**exec_properties, _REJECTS_DIR_KEY: rejects_dir})
        rejected = _read_rejected(rejects_dir)
        if len(rejected) > max_bad_files:
            raise ValueError(
                f"ImageExampleGen: {len(rejected)} bad input file(s), more than max_bad_files="
                f"{max_bad_files} allows skipping:\n  " + "\n  ".join(rejected)
            )
        if rejected:
            logging.warning(
                "ImageExampleGen skipped %d bad input file(s):\n  %s",
                len(rejected),
                "\n  ".join(rejected),
            )
        examples = artifact_utils.get_single_instance(
            output_dict[standard_component_specs.EXAMPLES_KEY]
        )
        examples.set_int_custom_property(SKIPPED_COUNT_PROPERTY, len(rejected))
        examples.set_json_value_custom_property(SKIPPED_FILES_PROPERTY, rejected)


def _read_rejected(rejects_dir):
    lines = []
    for path in fileio.glob(os.path.join(rejects_dir, "*")):
        with fileio.open(path, "r") as handle:
            lines.extend(line for line in handle.read().splitlines() if line)
    return sorted(lines)


class _Driver(driver.FileBasedDriver):
    """FileBasedDriver whose span-resolution errors say which input was looked for."""

    def resolve_exec_properties(self, exec_properties, pipeline_info, component_info):
        try:
            return super().resolve_exec_properties(exec_properties, pipeline_info, component_info)
        except ValueError as error:
            input_config = proto_utils.json_to_proto(
                exec_properties[standard_component_specs.INPUT_CONFIG_KEY], example_gen_pb2.Input()
            )
            patterns = ", ".join(f"{split.name}: {split.pattern}" for split in input_config.splits)
            raise ValueError(
                f"ImageExampleGen found no input under "
                f"{exec_properties.get(standard_component_specs.INPUT_BASE_KEY)} ({patterns}): "
                f"{error}. An empty span (no files in one of its split folders) has nothing to "
                "ingest."
            ) from error


class ImageExampleGen(FileBasedExampleGen):
    """Ingests labelled image folders and TFRecords of tf.Examples as the contract's Examples.

    Args: `input_base` (the data root); `input_config` (default: `span_input_config()`),
    `output_config` (e.g. hash buckets), `range_config` as for any FileBasedExampleGen;
    `image_shape` (height, width, channels) every image must decode to; `max_bad_files`, how
    many bad files a run may skip (default 0: any bad file fails the run); `labels_file`, the
    name of CSVs (`file,label`) that give labels instead of the folder names.
    """

    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)
    DRIVER_CLASS = _Driver

    def __init__(
        self,
        input_base,
        input_config=None,
        output_config=None,
        range_config=None,
        image_shape=DEFAULT_IMAGE_SHAPE,
        max_bad_files=0,
        labels_file=None,
    ):
        super().__init__(
            input_base=input_base,
            input_config=input_config or span_input_config(),
            output_config=output_config,
            custom_config=ingest_config(image_shape, max_bad_files, labels_file),
            range_config=range_config,
        )
