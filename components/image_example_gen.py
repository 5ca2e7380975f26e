"""ImageExampleGen: folders of labelled PNG/JPEG images and TFRecords of tf.Examples -> Examples.

A file-based TFX ExampleGen (FileBasedExampleGen's spec, driver and split handling, so
`span-{SPAN}` patterns and RangeConfig work as in any TFX ExampleGen)
with an executor that writes, for every image, a tf.Example with the data contract's features:
`image` (the encoded file, unchanged), `label` (int64), `variant` and `distortion` (bytes).

Span windows: with `span_window` K > 1 one run ingests spans N-K+1..N into one Examples
artifact (N: the span the driver resolves, the newest unless `range_config` names one), so the
statistics, the schema check and the gate downstream cover everything trained on. Every split
pattern must then hold `{SPAN}` (no `{VERSION}` or date specs); each span of the window must
have files for every split, else the run fails naming the missing spans' patterns (the window
is never shortened, and never reaches below span 0). The spans ingested are recorded on the
artifact (`spans`, oldest first; `span` stays N).

Input fingerprint: the driver's own, for every window size. It covers the relative path, size
and mtime (ns) of every file of every span of the window and of the manifests and labels files
above them, so a cached run re-runs when an image is added, edited or moved to another label
folder, or a manifest is edited. This holds with the local driver; a `--target vertex`
package runs TFX's own driver, which fingerprints span N only, by file count, total size and
whole-second mtimes, so it runs ingest uncached.

Every image is decoded and checked against the data set's shape. Bad inputs fail the run with
one line each, unless `max_bad_files` allows skipping that many. Each of these counts once: an
image file that cannot be read (a folder or a broken link named like one), is not decodable,
has another shape or no label (or one above 2**63-1); a FIFO, device or socket named like an
image or TFRecord file (not read: a FIFO blocks a read, /dev/zero never ends); a TFRecord file
that does not read to its end (none of its records are used); one record of a readable
TFRecord file that is not a valid example. A file name that is not UTF-8 fails the run naming
it: TensorFlow cannot list its folder at all; so does a manifest or labels CSV that is a FIFO,
device or socket. Skipped inputs are logged and recorded on the
output artifact (`skipped_file_count`, `skipped_files`: one entry per bad input).
"""

import copy
import gzip
import hashlib
import json
import os
import zlib
from typing import NamedTuple

import apache_beam as beam
import tensorflow as tf
from absl import logging
from google.protobuf import json_format, struct_pb2
from tfx.components import FileBasedExampleGen
from tfx.components.example_gen import driver
from tfx.components.example_gen import utils as example_gen_utils
from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
from tfx.components.example_gen.input_processor import FileBasedInputProcessor
from tfx.dsl.components.base import executor_spec
from tfx.dsl.io import fileio
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

from components import image_listing
from components.image_decoding import format_shape, image_problem, tf_reason

DEFAULT_IMAGE_SHAPE = (42, 42, 1)
SKIPPED_COUNT_PROPERTY = "skipped_file_count"
SKIPPED_FILES_PROPERTY = "skipped_files"
SPANS_PROPERTY = "spans"
LISTED_BAD_INPUTS = 20  # errors and warnings name this many bad inputs and count the rest
_REJECTED = "rejected"
_REJECTS_DIR_KEY = "_rejects_dir"
_SPAN_PATTERNS_KEY = "_span_patterns"
_RECORD_FRAMING = 16  # a TFRecord: 8-byte length, 4-byte CRC, the data, 4-byte CRC


class IngestSettings(NamedTuple):
    """The executor's settings; `span_patterns` ({split: pattern with {SPAN}}) with a window."""

    image_shape: tuple
    max_bad_files: int = 0
    labels_file: str | None = None
    span_window: int = 1
    span_patterns: dict | None = None


def span_input_config(train_pattern="span-{SPAN}/train/*/*", eval_pattern="span-{SPAN}/eval/*/*"):
    """The data contract's input config: splits `train` and `eval` of the latest span."""
    return example_gen_pb2.Input(
        splits=[
            example_gen_pb2.Input.Split(name="train", pattern=train_pattern),
            example_gen_pb2.Input.Split(name="eval", pattern=eval_pattern),
        ]
    )


def ingest_config(
    image_shape=DEFAULT_IMAGE_SHAPE,
    max_bad_files=0,
    labels_file=None,
    span_window=1,
    input_config=None,
):
    """The executor's settings as the ExampleGen's CustomConfig (a Struct in its Any).

    A `span_window` > 1 keeps the split patterns of `input_config` (default:
    `span_input_config()`), which the driver fills in with the newest span only, so the
    executor can fill them in with the window's other spans.
    """
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(size, int) and size > 0 for size in shape):
        raise ValueError(f"image_shape must be 3 positive ints (height, width, channels): {shape}")
    if isinstance(max_bad_files, bool) or not isinstance(max_bad_files, int) or max_bad_files < 0:
        raise ValueError(f"max_bad_files must be an int >= 0, got {max_bad_files!r}")
    if labels_file is not None and (not labels_file or os.sep in labels_file):
        raise ValueError(f"labels_file must be a file name such as 'labels.csv': {labels_file!r}")
    if isinstance(span_window, bool) or not isinstance(span_window, int) or span_window < 1:
        raise ValueError(f"span_window must be an int >= 1, got {span_window!r}")
    values = {
        "image_shape": list(shape),
        "max_bad_files": max_bad_files,
        "labels_file": labels_file,
    }
    if span_window > 1:
        values |= {
            "span_window": span_window,
            "span_patterns": _span_patterns(input_config or span_input_config()),
        }
    settings = struct_pb2.Struct()
    settings.update(values)
    config = example_gen_pb2.CustomConfig()
    config.custom_config.Pack(settings)
    return config


def _span_patterns(input_config):
    """{split name: pattern} of `input_config`, whose patterns must all hold one {SPAN}."""
    patterns = {}
    for split in input_config.splits:
        has_span, has_date, has_version = example_gen_utils.verify_split_pattern_specs(split)
        if not has_span or has_date or has_version:
            raise ValueError(
                f"span_window > 1 needs split patterns with {{SPAN}} and no {{VERSION}} or date "
                f"spec; split {split.name!r} has {split.pattern!r}"
            )
        patterns[split.name] = split.pattern
    return patterns


def ingest_settings(exec_properties):
    """The `IngestSettings` in the exec properties' custom config."""
    config = example_gen_pb2.CustomConfig()
    text = exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY)
    if text:
        proto_utils.json_to_proto(text, config)
    settings = struct_pb2.Struct()
    if config.HasField("custom_config") and not config.custom_config.Unpack(settings):
        raise ValueError(f"custom_config must hold a google.protobuf.Struct: {text}")
    values = json_format.MessageToDict(settings)
    return IngestSettings(
        image_shape=tuple(int(size) for size in values.get("image_shape", DEFAULT_IMAGE_SHAPE)),
        max_bad_files=int(values.get("max_bad_files", 0)),
        labels_file=values.get("labels_file"),
        span_window=int(values.get("span_window", 1)),
        span_patterns=values.get("span_patterns"),
    )


def window_inputs(exec_properties):
    """(spans, {split name: [file pattern of each span]}) of the run the driver resolved.

    One span: the driver's patterns. A window of K: spans N-K+1..N (N: the resolved span),
    oldest first; raises ValueError naming the spans whose files are missing.
    """
    settings = ingest_settings(exec_properties)
    newest = int(exec_properties[example_gen_utils.SPAN_PROPERTY_NAME])
    if settings.span_window == 1:
        splits = _input_config(exec_properties).splits
        return (newest,), {split.name: [split.pattern] for split in splits}
    first = newest - settings.span_window + 1
    if first < 0:
        raise ValueError(
            f"ImageExampleGen: span_window={settings.span_window} ending at span {newest} "
            f"would need spans {first}..{newest}, below span 0"
        )
    spans = tuple(range(first, newest + 1))
    patterns = {
        name: [_pattern_for_span(pattern, span) for span in spans]
        for name, pattern in settings.span_patterns.items()
    }
    _check_window_exists(exec_properties[standard_component_specs.INPUT_BASE_KEY], spans, patterns)
    return spans, patterns


def _input_config(exec_properties):
    """The exec properties' input config (after the driver: patterns of the resolved span)."""
    return proto_utils.json_to_proto(
        exec_properties[standard_component_specs.INPUT_CONFIG_KEY], example_gen_pb2.Input()
    )


def _pattern_for_span(pattern, span):
    return example_gen_utils.get_pattern_for_span_version(
        pattern,
        is_match_span=True,
        is_match_date=False,
        is_match_version=False,
        span=span,
        version=None,
    )


def _check_window_exists(input_base, spans, patterns):
    missing = [
        f"span {span}: no files match {os.path.join(input_base, pattern)}"
        for split_patterns in patterns.values()
        for span, pattern in zip(spans, split_patterns, strict=True)
        if not fileio.glob(os.path.join(input_base, pattern))
    ]
    if missing:
        raise ValueError(
            f"ImageExampleGen: the span window {spans[0]}..{spans[-1]} needs every split of "
            "every span; missing:\n  " + "\n  ".join(missing)
        )


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
        if source.problem is None:
            data, problem = _read_image(source.path, self._shape)
        else:
            data, problem = None, source.problem
        if problem is not None:
            yield beam.pvalue.TaggedOutput(_REJECTED, f"{source.path} {problem}")
        else:
            yield _example(data, source.label, source.variant, source.distortion)


def _read_image(path, shape):
    """(the encoded image at `path`, None), or (None, what is wrong with it)."""
    reason = image_listing.special_file_reason(path)
    if reason is not None:
        return None, f"cannot be read ({reason})"
    try:
        with fileio.open(path, "rb") as handle:
            data = handle.read()
    except tf.errors.OpError as error:  # a folder named like an image, a broken link
        return None, f"cannot be read ({_file_reason(path, error)})"
    problem = image_problem(data, shape)
    return (None, problem) if problem is not None else (data, None)


def _file_reason(path, error):
    """TensorFlow's words for a file error, without the path it starts with."""
    return tf_reason(error.message).removeprefix(f"{path}; ")


class _TFRecordToExamples(beam.DoFn):
    """TFRecord path -> its tf.Examples, completed with the contract's optional features."""

    def __init__(self, shape):
        self._shape = shape

    def process(self, path):
        records, problem = _read_tfrecord(path)
        if problem is not None:
            yield beam.pvalue.TaggedOutput(
                _REJECTED,
                f"{path} is not a readable TFRecord file ({problem}); none of its records are used",
            )
            return
        for index, record in enumerate(records):
            example, problem = self._check(record)
            if problem is not None:
                yield beam.pvalue.TaggedOutput(_REJECTED, f"{path} record {index} {problem}")
            else:
                yield example

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


def _read_tfrecord(path):
    """(records, None) for a TFRecord file that reads to its end, else (None, what is wrong).

    TensorFlow's reader takes a file cut inside a record's 12-byte header for its end, so the
    records must also account for every byte of the record stream (each is its data plus 16
    bytes of length and CRCs). A `.gz` file's stream is its decompressed content, which
    Python's gzip reads to the end-of-stream marker, so a cut anywhere in it is found too.
    """
    reason = image_listing.special_file_reason(path)
    if reason is not None:
        return None, reason
    compression = "GZIP" if path.lower().endswith(".gz") else ""
    dataset = tf.data.TFRecordDataset(path, compression_type=compression)
    try:
        records = list(dataset.as_numpy_iterator())
        size = _record_stream_size(path, compression)
    except tf.errors.OpError as error:  # a cut record, a folder, a broken link
        return None, _file_reason(path, error)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        return None, f"GZIP: {error}"
    whole = sum(len(record) + _RECORD_FRAMING for record in records)
    if whole != size:
        return None, f"{len(records)} whole record(s) end at byte {whole} of {size}: a cut record"
    return records, None


def _record_stream_size(path, compression):
    """Bytes of the file's record stream: its size, or with GZIP its decompressed size."""
    if not compression:
        return fileio.stat(path).length
    size = 0
    with fileio.open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as stream:
        while chunk := stream.read(1 << 20):
            size += len(chunk)
    return size


@beam.ptransform_fn
@beam.typehints.with_input_types(beam.Pipeline)
@beam.typehints.with_output_types(tf.train.Example)
def _InputToExamples(pipeline, exec_properties, split_pattern):
    """Reads one input split (images and/or TFRecords) of every span of the window."""
    settings = ingest_settings(exec_properties)
    input_base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
    patterns = exec_properties[_SPAN_PATTERNS_KEY][split_pattern]
    images, tfrecords = [], []
    for pattern in patterns:
        span_images, span_tfrecords = image_listing.list_split(
            input_base, pattern, settings.labels_file
        )
        images += span_images
        tfrecords += span_tfrecords
    logging.info(
        "ImageExampleGen: %s match %d image and %d TFRecord files; image shape %s",
        ", ".join(patterns),
        len(images),
        len(tfrecords),
        format_shape(settings.image_shape),
    )
    from_images = (
        pipeline
        | "ListImages" >> beam.Create(images, reshuffle=True)
        | "DecodeImages"
        >> beam.ParDo(_ImageToExample(settings.image_shape)).with_outputs(_REJECTED, main="ok")
    )
    from_tfrecords = (
        pipeline
        | "ListTFRecords" >> beam.Create(tfrecords)
        | "ReadTFRecords"
        >> beam.ParDo(_TFRecordToExamples(settings.image_shape)).with_outputs(_REJECTED, main="ok")
    )
    rejects_name = hashlib.sha256(split_pattern.encode()).hexdigest()[:16]
    _ = (
        (from_images[_REJECTED], from_tfrecords[_REJECTED])
        | "MergeRejected" >> beam.Flatten()
        | "OneLineEach" >> beam.Map(json.dumps)  # a newline in a file name stays in its line
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
        max_bad_files = ingest_settings(exec_properties).max_bad_files
        spans, patterns = window_inputs(exec_properties)
        input_config = _input_config(exec_properties)
        rejects_dir = os.path.join(self._get_tmp_dir(), "rejected")
        fileio.makedirs(rejects_dir)
        span_patterns = {split.pattern: patterns[split.name] for split in input_config.splits}
        super().Do(
            input_dict,
            output_dict,
            {**exec_properties, _REJECTS_DIR_KEY: rejects_dir, _SPAN_PATTERNS_KEY: span_patterns},
        )
        rejected = _read_rejected(rejects_dir)
        if len(rejected) > max_bad_files:
            raise ValueError(
                f"ImageExampleGen: {len(rejected)} bad input(s), more than max_bad_files="
                f"{max_bad_files} allows skipping:\n  " + "\n  ".join(listed(rejected))
            )
        if rejected:
            logging.warning(
                "ImageExampleGen skipped %d bad input(s):\n  %s",
                len(rejected),
                "\n  ".join(listed(rejected)),
            )
        examples = artifact_utils.get_single_instance(
            output_dict[standard_component_specs.EXAMPLES_KEY]
        )
        examples.set_int_custom_property(SKIPPED_COUNT_PROPERTY, len(rejected))
        examples.set_json_value_custom_property(SKIPPED_FILES_PROPERTY, rejected)
        examples.set_json_value_custom_property(SPANS_PROPERTY, list(spans))


def ingested_spans(examples):
    """The spans an Examples artifact of this component holds, oldest first.

    Artifacts written before `spans` was recorded hold their `span` only.
    """
    spans = examples.get_json_value_custom_property(SPANS_PROPERTY)
    if spans is None:
        return (examples.get_int_custom_property(example_gen_utils.SPAN_PROPERTY_NAME),)
    return tuple(int(span) for span in spans)


def listed(rejected):
    """The first `LISTED_BAD_INPUTS` reject lines, and a count of the others: a data set of the
    wrong image size would otherwise fill a screen per thousand images."""
    if len(rejected) <= LISTED_BAD_INPUTS:
        return list(rejected)
    return [*rejected[:LISTED_BAD_INPUTS], f"... and {len(rejected) - LISTED_BAD_INPUTS} more"]


def _read_rejected(rejects_dir):
    """The sorted reject lines the executor wrote to `rejects_dir`, one JSON string a line."""
    rejected = []
    for path in fileio.glob(os.path.join(rejects_dir, "*")):
        with fileio.open(path, "r") as handle:
            rejected.extend(json.loads(line) for line in handle.read().split("\n") if line)
    return sorted(rejected)


def _input_fingerprint(input_base, spans, patterns, labels_file=None):
    """One line per split and span that changes when any input of that span and split does.

    It covers every matched file's path (relative to `input_base`), size and mtime in
    nanoseconds, and the same of the manifests and labels files above them, so a file moved
    to another label folder or an edited manifest changes it. Files are stat'ed, not read.
    """
    return "\n".join(
        f"span:{span},split:{name},"
        + _files_fingerprint(input_base, os.path.join(input_base, pattern), labels_file)
        for name, split_patterns in patterns.items()
        for span, pattern in zip(spans, split_patterns, strict=True)
    )


def _files_fingerprint(input_base, pattern, labels_file):
    """'num_files:N,total_bytes:B,sha256:D' of the files `pattern` matches and their CSVs."""
    paths = fileio.glob(pattern)
    metadata = image_listing.metadata_paths(input_base, paths, labels_file)
    digest = hashlib.sha256()
    total_bytes = 0
    for path in sorted({*paths, *metadata}):
        size, mtime_ns = _size_and_mtime(path)
        total_bytes += max(size, 0)
        relative = image_listing.relative_path(path, input_base) or path
        digest.update(f"{relative}\0{size}\0{mtime_ns}\n".encode())
    return f"num_files:{len(paths)},total_bytes:{total_bytes},sha256:{digest.hexdigest()}"


def _size_and_mtime(path):
    """(size, mtime in ns) of `path`; (-1, -1) when it cannot be stat'ed (a broken link)."""
    try:
        stat = fileio.stat(path)
    except (OSError, tf.errors.OpError):  # the executor names the file and what is wrong
        return -1, -1
    return stat.length, stat.mtime_nsec


class _SpanResolver(FileBasedInputProcessor):
    """TFX's span and version resolution, without TFX's input fingerprint (the driver's own)."""

    def resolve_span_and_version(self):
        resolved = {
            split.name: example_gen_utils._get_target_span_version(  # TFX's resolution, pinned
                self._input_base_uri, copy.deepcopy(split), self._range_config
            )
            for split in self._splits
        }
        if len({(span or 0, version) for span, version in resolved.values()}) > 1:
            raise ValueError(f"the newest (span, version) differs between splits: {resolved}")
        span, version = next(iter(resolved.values()))
        return span or 0, version

    def get_input_fingerprint(self, span, version):
        return None


class _Driver(driver.FileBasedDriver):
    """FileBasedDriver whose errors say which input was looked for, with its own fingerprint.

    The fingerprint (`_input_fingerprint`) covers every split of every span of the window.
    """

    def get_input_processor(self, splits, range_config=None, input_base_uri=None):
        return _SpanResolver(input_base_uri, splits, range_config)

    def resolve_exec_properties(self, exec_properties, pipeline_info, component_info):
        input_base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
        try:
            exec_properties = self._resolve_newest_span(
                exec_properties, pipeline_info, component_info
            )
            spans, patterns = window_inputs(exec_properties)
            exec_properties[example_gen_utils.FINGERPRINT_PROPERTY_NAME] = _input_fingerprint(
                input_base, spans, patterns, ingest_settings(exec_properties).labels_file
            )
        except UnicodeDecodeError as error:  # TensorFlow's glob fails on the whole listing
            raise ValueError(
                f"ImageExampleGen: a file under {input_base} has a name that is not UTF-8, so "
                f"TensorFlow cannot list its folder: {error.object!r}; rename it (max_bad_files "
                "cannot skip it)"
            ) from error
        return exec_properties

    def _resolve_newest_span(self, exec_properties, pipeline_info, component_info):
        try:
            resolved = super().resolve_exec_properties(
                exec_properties, pipeline_info, component_info
            )
        except UnicodeDecodeError:  # a ValueError too, but resolve_exec_properties names it
            raise
        except ValueError as error:
            splits = _input_config(exec_properties).splits
            patterns = ", ".join(f"{split.name}: {split.pattern}" for split in splits)
            input_base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
            if str(error).startswith("Cannot find matching"):
                raise ValueError(
                    f"ImageExampleGen found no input under {input_base} ({patterns}): {error}. "
                    "An empty span (no files in one of its split folders) has nothing to ingest."
                ) from error
            raise ValueError(
                f"ImageExampleGen cannot resolve the span under {input_base} ({patterns}): {error}"
            ) from error
        _check_span(resolved)
        return resolved


def _check_span(exec_properties):
    """Raise ValueError naming the resolved span's files if ML Metadata cannot record it."""
    span = exec_properties[example_gen_utils.SPAN_PROPERTY_NAME]
    if span > image_listing.MAX_INT64:
        input_base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
        splits = _input_config(exec_properties).splits
        files = ", ".join(os.path.join(input_base, split.pattern) for split in splits)
        raise ValueError(
            f"ImageExampleGen: span {span} ({files}) is above 2**63-1, the largest span ML "
            "Metadata records; renumber it"
        )


class ImageExampleGen(FileBasedExampleGen):
    """Ingests labelled image folders and TFRecords of tf.Examples as the contract's Examples.

    Args: `input_base` (the data root); `input_config` (default: `span_input_config()`),
    `output_config` (e.g. hash buckets), `range_config` as for any FileBasedExampleGen;
    `image_shape` (height, width, channels) every image must decode to; `max_bad_files`, how
    many bad inputs (files, or records of TFRecord files) a run may skip (default 0: any bad
    input fails the run); `labels_file`, the name of CSVs (`file,label`) that give labels
    instead of the folder names; `span_window`, how many spans up to the resolved one to
    ingest (default 1).
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
        span_window=1,
    ):
        input_config = input_config or span_input_config()
        super().__init__(
            input_base=input_base,
            input_config=input_config,
            output_config=output_config,
            custom_config=ingest_config(
                image_shape, max_bad_files, labels_file, span_window, input_config
            ),
            range_config=range_config,
        )
