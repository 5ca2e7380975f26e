"""ImageExampleGen: real spans of PNG files ingested by the real component under LocalDagRunner.

Also holds the helpers test_validation.py uses: `write_test_span`, `run_pipeline`,
`node_states` and the `Downstream` sentinel component.
"""

import csv
import io
import json
import logging
import os
import re
import struct
import threading
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2
from PIL import Image
from tfx.dsl.component.experimental.decorators import component
from tfx.orchestration import metadata
from tfx.orchestration import pipeline as tfx_pipeline
from tfx.orchestration.local.local_dag_runner import LocalDagRunner
from tfx.proto import example_gen_pb2, range_config_pb2
from tfx.types import standard_artifacts
from tfx.utils import proto_utils

from components import image_example_gen, image_listing
from components.gate import DataValidationError
from components.image_decoding import image_problem
from components.image_example_gen import ImageExampleGen
from pipeline.validation import build_validation

SHAPE = (42, 42, 1)
COMPLETE = metadata_store_pb2.Execution.COMPLETE
CACHED = metadata_store_pb2.Execution.CACHED
OUTPUTS = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.PENDING_OUTPUT)


def png_bytes(array, image_format="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def digit_array(seed, size=42):
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def write_test_span(data_root, span=1, labels=None, size=42):
    """A span per the data contract: {split: [label, ...]} -> PNGs and manifest.csv."""
    labels = (
        labels if labels is not None else {"train": list(range(10)) * 2, "eval": list(range(10))}
    )
    folder = Path(data_root) / f"span-{span}"
    rows = []
    for number, (split, split_labels) in enumerate(labels.items()):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for index, label in enumerate(split_labels):
            name = f"{split}/{label}/{index:06d}.png"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            seed = span * 100_000 + number * 10_000 + index  # no image in two splits (leakage)
            Image.fromarray(digit_array(seed, size)).save(folder / name)
            params = {"angle_deg": round(index * 1.5, 1), "dx": index % 3}
            rows.append((name, split, label, index, "rts", json.dumps(params)))
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("file", "split", "label", "source_index", "variant", "params"))
        writer.writerows(rows)
    return folder


@component
def Downstream():
    """A sentinel: it runs only when everything upstream succeeded."""


def run_pipeline(tmp_path, components, name="test", enable_cache=False):
    """Runs `components` (+ a Downstream sentinel after the last) under LocalDagRunner.

    Returns the MLMD connection config; re-raises the failing component's error.
    """
    downstream = Downstream()
    downstream.add_upstream_node(components[-1])
    config = metadata_config(tmp_path)
    pipeline = tfx_pipeline.Pipeline(
        pipeline_name=name,
        pipeline_root=str(tmp_path / "pipeline_root"),
        components=[*components, downstream],
        metadata_connection_config=config,
        enable_cache=enable_cache,
    )
    LocalDagRunner().run(pipeline)
    return config


def node_states(config):
    """{node id: [execution states]} recorded in the MLMD store at `config`."""
    store = metadata_store.MetadataStore(config)
    return {
        context.name.split(".", 1)[1]: [
            execution.last_known_state for execution in store.get_executions_by_context(context.id)
        ]
        for context in store.get_contexts_by_type("node")
    }


def read_examples(artifact_uri, split):
    """The tf.Examples in one split folder of an Examples artifact."""
    files = sorted(Path(artifact_uri, f"Split-{split}").glob("*.gz"))
    dataset = tf.data.TFRecordDataset([str(path) for path in files], compression_type="GZIP")
    return [tf.train.Example.FromString(record) for record in dataset.as_numpy_iterator()]


def example_tuple(example):
    feature = example.features.feature
    return (
        feature["image"].bytes_list.value[0],
        feature["label"].int64_list.value[0],
        feature["variant"].bytes_list.value[0].decode(),
        json.loads(feature["distortion"].bytes_list.value[0]),
    )


def files_as_tuples(span_folder, split):
    """What the examples of `split` must hold, read independently from the files + manifest."""
    with open(Path(span_folder) / "manifest.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == split]
    return sorted(
        (
            (Path(span_folder) / row["file"]).read_bytes(),
            int(row["label"]),
            row["variant"],
            json.loads(row["params"]),
        )
        for row in rows
    )


def assert_examples_match_files(artifact_uri, span_folder):
    for split in ("train", "eval"):
        found = sorted(example_tuple(example) for example in read_examples(artifact_uri, split))
        assert found == files_as_tuples(span_folder, split)


def artifact_of(config, artifact_class):
    """The one artifact of `artifact_class` in the MLMD store at `config`, as a TFX artifact."""
    store = metadata_store.MetadataStore(config)
    [mlmd_artifact] = store.get_artifacts_by_type(artifact_class.TYPE_NAME)
    artifact = artifact_class()
    artifact.set_mlmd_artifact(mlmd_artifact)
    return artifact


def examples_artifact(config):
    return artifact_of(config, standard_artifacts.Examples)


def metadata_config(tmp_path):
    """The SQLite MLMD connection config of the pipeline run in `tmp_path`."""
    return metadata.sqlite_metadata_connection_config(str(tmp_path / "metadata.sqlite"))


def bad_files(span_folder):
    """Adds a truncated PNG, a text file named .png and a 28x28 PNG; {path: expected words}."""
    truncated = span_folder / "train" / "3" / "truncated.png"
    truncated.write_bytes(png_bytes(digit_array(1))[:300])
    text = span_folder / "train" / "4" / "notes.png"
    text.write_text("this is not an image\n")
    small = span_folder / "eval" / "5" / "small.png"
    small.write_bytes(png_bytes(digit_array(2, size=28)))
    return {
        truncated: "is not a decodable PNG image",
        text: "is not a PNG or JPEG file",
        small: "decodes to shape 28x28x1, expected 42x42x1",
    }


# ---- image checks (no pipeline) ----


def test_image_problem_accepts_png_and_jpeg_of_the_data_set_shape():
    assert image_problem(png_bytes(digit_array(0)), SHAPE) is None
    assert image_problem(png_bytes(digit_array(0), "JPEG"), SHAPE) is None


@pytest.mark.parametrize(
    "data, words",
    [
        (b"plain text, no image", "is not a PNG or JPEG file"),
        (png_bytes(digit_array(0))[:200], "is not a decodable PNG image"),
        (png_bytes(digit_array(0, size=28)), "decodes to shape 28x28x1, expected 42x42x1"),
        (png_bytes(np.zeros((42, 42, 3), np.uint8)), "decodes to shape 42x42x3"),
        (png_bytes(digit_array(0), "GIF"), "is not a PNG or JPEG file"),
    ],
)
def test_image_problem_names_what_is_wrong(data, words):
    assert words in image_problem(data, SHAPE)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_image_problem_refuses_a_larger_image_by_its_header_without_decoding_it(
    image_format, monkeypatch
):
    # A decompression bomb: a PNG of 16,000 x 16,000 zeros is 250 KB but decodes into 256 MB.
    data = png_bytes(np.zeros((2000, 3000), np.uint8), image_format)

    def decode_image(*args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(tf.io, "decode_image", decode_image)
    expected = "is 2000x3000 by its header, expected 42x42x1 (not decoded)"
    assert image_problem(data, SHAPE) == expected


def test_image_problem_rejects_a_png_whose_last_checksum_is_wrong():
    # Pillow decodes this file without complaint; TensorFlow (the trainer's decoder) does not.
    data = bytearray(png_bytes(digit_array(0)))
    data[-2] ^= 0x55  # a byte of the IEND chunk's CRC
    Image.open(io.BytesIO(bytes(data))).load()
    assert "is not a decodable PNG image" in image_problem(bytes(data), SHAPE)


@pytest.mark.parametrize(
    "name, read, problem",
    [
        (
            "a.png",
            lambda path: image_example_gen._read_image(path, SHAPE),
            "cannot be read (not a regular file: a FIFO, a device or a socket)",
        ),
        (
            "a.tfrecord",
            image_example_gen._read_tfrecord,
            "not a regular file: a FIFO, a device or a socket",
        ),
    ],
)
def test_a_fifo_named_like_an_input_is_a_bad_input_not_read(tmp_path, name, read, problem):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    assert _call_unless_blocked_on(fifo, lambda: read(str(fifo))) == (None, problem)


def test_a_fifo_named_like_a_manifest_is_refused_not_read(tmp_path):
    span = write_test_span(tmp_path, labels={"train": [7], "eval": []})
    (span / image_listing.MANIFEST).unlink()
    os.mkfifo(span / image_listing.MANIFEST)

    def listing():
        with pytest.raises(ValueError) as refused:
            image_listing.list_split(str(tmp_path), "span-1/train/*/*")
        return str(refused.value)

    assert _call_unless_blocked_on(span / image_listing.MANIFEST, listing) == (
        f"{span / image_listing.MANIFEST}: cannot be read (not a regular file: a FIFO, a "
        "device or a socket)"
    )


def _call_unless_blocked_on(fifo, function):
    """`function()`'s result; it fails if `function` blocked on opening `fifo` (released)."""
    results = []
    reader = threading.Thread(target=lambda: results.append(function()))
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked opening the FIFO, as ingest would be forever: release it
        with open(fifo, "wb"):
            pass
        reader.join()
        pytest.fail(f"blocked reading {fifo}")
    return results[0]


# ---- listing a split (no pipeline) ----


def test_list_split_takes_labels_from_folders_and_details_from_the_manifest(tmp_path):
    span = write_test_span(tmp_path, labels={"train": [7, 2], "eval": [1]})
    (span / "train" / "cat").mkdir()
    (span / "train" / "cat" / "x.png").write_bytes(png_bytes(digit_array(3)))
    (span / "train" / "2" / "readme.txt").write_text("hello")
    images, tfrecords = image_listing.list_split(str(tmp_path), "span-1/train/*/*")
    by_name = {Path(source.path).name: source for source in images}
    assert tfrecords == []
    assert len(images) == 4
    assert by_name["000000.png"].label == 7
    assert by_name["000001.png"].label == 2
    assert by_name["000001.png"].variant == "rts"
    assert json.loads(by_name["000001.png"].distortion) == {"angle_deg": 1.5, "dx": 1}
    assert "folder name 'cat' is not a class index" in by_name["x.png"].problem
    assert "is neither an image" in by_name["readme.txt"].problem


def test_list_split_reads_labels_from_a_labels_file(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.jpg", "c.png"):
        (folder / name).write_bytes(png_bytes(digit_array(4)))
    (folder / "labels.csv").write_text("file,label\na.png,4\nb.jpg,9\n")
    images, _ = image_listing.list_split(str(tmp_path), "*/*", labels_file="labels.csv")
    by_name = {Path(source.path).name: source for source in images}
    assert sorted(by_name) == ["a.png", "b.jpg", "c.png"]  # not photos/labels.csv
    assert (by_name["a.png"].label, by_name["b.jpg"].label) == (4, 9)
    assert by_name["a.png"].variant == image_listing.UNKNOWN_VARIANT
    assert by_name["a.png"].distortion == "{}"
    assert "is not listed in any labels.csv" in by_name["c.png"].problem


@pytest.mark.parametrize("input_base", [".", "./", "span-1/..", "{root}"])
def test_list_split_finds_the_manifest_from_a_relative_data_root(tmp_path, monkeypatch, input_base):
    write_test_span(tmp_path, labels={"train": [7], "eval": []})
    monkeypatch.chdir(tmp_path)
    [image], _ = image_listing.list_split(input_base.format(root=tmp_path), "span-1/train/*/*")
    assert (image.label, image.variant, json.loads(image.distortion)) == (
        7,
        "rts",
        {"angle_deg": 0.0, "dx": 0},
    )


def test_list_split_reads_the_csvs_of_a_uri_data_root(tmp_path):
    # TensorFlow's in-memory ram:// filesystem stands in for gs:// and s3://.
    root = f"ram://{tmp_path.name}/data"
    tf.io.gfile.makedirs(f"{root}/span-1/train/3")
    files = {
        "span-1/train/3/a.png": png_bytes(digit_array(0)),
        "span-1/manifest.csv": b'file,variant,params\ntrain/3/a.png,rts,"{""dx"": 2}"\n',
        "span-1/train/labels.csv": b"file,label\n3/a.png,5\n",
    }
    for name, data in files.items():
        with tf.io.gfile.GFile(f"{root}/{name}", "wb") as handle:
            handle.write(data)
    for input_base in (root, f"{root}/"):
        [image], _ = image_listing.list_split(input_base, "span-1/train/*/*")
        assert image == image_listing.ImageSource(
            f"{root}/span-1/train/3/a.png", 3, "rts", '{"dx": 2}'
        )
    [labelled], _ = image_listing.list_split(root, "span-1/train/*/*", labels_file="labels.csv")
    assert (labelled.label, labelled.variant) == (5, "rts")


def test_list_split_of_an_empty_pattern_is_an_error(tmp_path):
    (tmp_path / "span-1" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"span-1/train/\*/\*' matches no files"):
        image_listing.list_split(str(tmp_path), "span-1/train/*/*")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"image_shape": (42, 42)}, "image_shape must be 3 positive ints"),
        ({"max_bad_files": -1}, "max_bad_files must be an int >= 0"),
        ({"labels_file": "a/labels.csv"}, "labels_file must be a file name"),
    ],
)
def test_ingest_config_rejects_bad_settings(kwargs, words):
    with pytest.raises(ValueError, match=words):
        image_example_gen.ingest_config(**kwargs)


def test_ingest_config_reaches_the_executor_through_exec_properties():
    config = image_example_gen.ingest_config((28, 30, 3), max_bad_files=5, labels_file="l.csv")
    # The component stores custom_config as JSON; the executor reads it back.
    exec_properties = {"custom_config": proto_utils.proto_to_json(config)}
    assert image_example_gen.ingest_settings(exec_properties) == ((28, 30, 3), 5, "l.csv", 1, None)
    assert image_example_gen.ingest_settings({}) == (SHAPE, 0, None, 1, None)
    window = image_example_gen.ingest_config(
        span_window=3, input_config=image_example_gen.span_input_config()
    )
    settings = image_example_gen.ingest_settings(
        {"custom_config": proto_utils.proto_to_json(window)}
    )
    assert settings.span_window == 3
    assert settings.span_patterns == {
        "train": "span-{SPAN}/train/*/*",
        "eval": "span-{SPAN}/eval/*/*",
    }


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"span_window": 0}, "span_window must be an int >= 1, got 0"),
        ({"span_window": True}, "span_window must be an int >= 1, got True"),
        (
            {"span_window": 2, "input_config": image_example_gen.span_input_config("all/*")},
            "span_window > 1 needs split patterns with {SPAN}.*split 'train' has 'all/\\*'",
        ),
        (
            {
                "span_window": 2,
                "input_config": image_example_gen.span_input_config(
                    "span-{SPAN}/v{VERSION}/*", "span-{SPAN}/v{VERSION}/*"
                ),
            },
            "no {VERSION} or date spec",
        ),
    ],
)
def test_ingest_config_rejects_a_window_it_cannot_ingest(kwargs, words):
    with pytest.raises(ValueError, match=words):
        image_example_gen.ingest_config(**kwargs)


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("labels.csv", "file,label\na.png,4\nb.png\n", "line 3: no 'label' value"),
        ("labels.csv", "file,label\na.png,4\nb.png,\n", "line 3: no 'label' value"),
        ("labels.csv", "file,label\n,4\n", "line 2: no 'file' value"),
        ("manifest.csv", "file,variant,params\na.png,rts\n", "line 2: no 'params' value"),
        ("manifest.csv", 'file,variant,params\na.png,,"{}"\n', "line 2: no 'variant' value"),
    ],
)
def test_a_csv_row_without_a_required_value_names_file_line_and_column(tmp_path, name, text, words):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(digit_array(4)))
    (folder / name).write_text(text)
    with pytest.raises(ValueError, match=words) as raised:
        image_listing.list_split(str(tmp_path), "*/*.png", labels_file="labels.csv")
    assert str(raised.value).startswith(f"{folder / name}, line")


def test_a_csv_that_is_not_utf8_is_named_with_its_line_and_byte(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(digit_array(4)))
    (folder / "manifest.csv").write_bytes(b'file,variant,params\na.png,r\xe9s,"{}"\n')
    with pytest.raises(ValueError) as raised:
        image_listing.list_split(str(tmp_path), "*/*.png")
    assert str(raised.value).startswith(f"{folder / 'manifest.csv'}, line 2: byte 27 (b'\\xe9') ")


def test_csvs_saved_with_a_utf8_byte_order_mark_are_read(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(digit_array(4)))
    # as Excel saves "CSV UTF-8"
    (folder / "labels.csv").write_text("file,label\na.png,4\n", encoding="utf-8-sig")
    manifest = 'file,variant,params\na.png,r,"{""angle_deg"": 5}"\n'
    (folder / "manifest.csv").write_text(manifest, encoding="utf-8-sig")
    [image], _ = image_listing.list_split(str(tmp_path), "*/*.png", labels_file="labels.csv")
    assert (image.label, image.variant, image.distortion) == (4, "r", '{"angle_deg": 5}')


# ---- TFRecord files (the executor's DoFn, no pipeline) ----


def write_tfrecord(path, labels, compression=None):
    """A TFRecord of contract examples with `labels`; their (image, label) tuples."""
    originals = []
    with tf.io.TFRecordWriter(str(path), compression) as writer:
        for index, label in enumerate(labels):
            image = png_bytes(digit_array(1000 + index))
            example = tf.train.Example()
            example.features.feature["image"].bytes_list.value.append(image)
            example.features.feature["label"].int64_list.value.append(label)
            writer.write(example.SerializeToString())
            originals.append((image, label))
    return originals


def read_tfrecord_file(path):
    """What `_TFRecordToExamples` makes of `path`: ([(image, label)], [rejected lines])."""
    examples, rejected = [], []
    for output in image_example_gen._TFRecordToExamples(SHAPE).process(str(path)):
        if isinstance(output, beam.pvalue.TaggedOutput):
            rejected.append(output.value)
        else:
            examples.append(example_tuple(output)[:2])
    return examples, rejected


def test_a_readable_tfrecord_file_gives_all_its_examples(tmp_path):
    path = tmp_path / "part-0.tfrecord"
    originals = write_tfrecord(path, [3, 1, 4])
    assert read_tfrecord_file(path) == (originals, [])


def first_record_end(data):
    """Where the first record of uncompressed TFRecord `data` ends (length + CRC, data, CRC)."""
    [length] = struct.unpack("<Q", data[:8])
    return 8 + 4 + length + 4


@pytest.mark.parametrize(
    "anchor, offset",
    [
        ("start", 5),  # inside the first record's header: TensorFlow reads an empty file
        ("second", 1),  # inside the second record's 12-byte header: TensorFlow reads one record
        ("second", 8),
        ("second", 11),
        ("second", 12),  # the second record's data is missing
        ("end", -100),  # inside the last record's data
        ("end", -2),  # inside the last record's data CRC
    ],
)
def test_a_truncated_tfrecord_file_gives_no_example_and_one_clean_reason(tmp_path, anchor, offset):
    path = tmp_path / "part-0.tfrecord"
    write_tfrecord(path, [3, 1, 4])
    data = path.read_bytes()
    start = {"start": 0, "second": first_record_end(data), "end": len(data)}[anchor]
    path.write_bytes(data[: start + offset])
    examples, [line] = read_tfrecord_file(path)
    assert examples == []
    assert line.startswith(f"{path} is not a readable TFRecord file (")
    assert line.endswith("); none of its records are used")
    assert "{{" not in line and "[Op:" not in line and "name:" not in line


def test_a_tfrecord_file_cut_inside_a_header_names_where_its_records_end(tmp_path):
    path = tmp_path / "part-0.tfrecord"
    write_tfrecord(path, [3, 1, 4])
    data = path.read_bytes()
    end = first_record_end(data)
    path.write_bytes(data[: end + 7])
    _, [line] = read_tfrecord_file(path)
    assert f"(1 whole record(s) end at byte {end} of {end + 7}: a cut record)" in line


@pytest.mark.parametrize("where", ["header", "middle", "trailer"])
def test_a_truncated_gzip_tfrecord_file_gives_no_example(tmp_path, where):
    path = tmp_path / "part-0.tfrecord.gz"
    originals = write_tfrecord(path, [3, 1, 4], "GZIP")
    assert read_tfrecord_file(path) == (originals, [])
    data = path.read_bytes()
    cut = {"header": 10, "middle": len(data) // 2, "trailer": len(data) - 4}[where]
    path.write_bytes(data[:cut])
    examples, [line] = read_tfrecord_file(path)
    assert examples == []
    assert line.startswith(f"{path} is not a readable TFRecord file (")


# ---- the component under LocalDagRunner ----


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """Span 1 (older) and span 2 (the latest, 30 images) ingested with the default config."""
    tmp_path = tmp_path_factory.mktemp("clean")
    data_root = tmp_path / "data"
    write_test_span(data_root, span=1, labels={"train": [0], "eval": [0]})
    span = write_test_span(data_root, span=2)
    config = run_pipeline(tmp_path, [ImageExampleGen(input_base=str(data_root))])
    return span, config


def test_ingests_the_latest_span_with_its_images_labels_and_manifest(clean_run):
    span, config = clean_run
    artifact = examples_artifact(config)
    assert artifact.get_int_custom_property("span") == 2
    assert_examples_match_files(artifact.uri, span)
    assert artifact.get_int_custom_property(image_example_gen.SKIPPED_COUNT_PROPERTY) == 0
    assert node_states(config)["Downstream"] == [COMPLETE]


def test_the_one_span_artifact_lists_its_span(clean_run):
    _, config = clean_run
    artifact = examples_artifact(config)
    assert artifact.get_json_value_custom_property(image_example_gen.SPANS_PROPERTY) == [2]
    assert image_example_gen.ingested_spans(artifact) == (2,)


@pytest.mark.slow
def test_range_config_selects_an_older_span(tmp_path):
    data_root = tmp_path / "data"
    span = write_test_span(data_root, span=1, labels={"train": [1, 2], "eval": [3]})
    write_test_span(data_root, span=2)
    example_gen = ImageExampleGen(
        input_base=str(data_root),
        range_config=range_config_pb2.RangeConfig(
            static_range=range_config_pb2.StaticRange(start_span_number=1, end_span_number=1)
        ),
    )
    artifact = examples_artifact(run_pipeline(tmp_path, [example_gen]))
    assert artifact.get_int_custom_property("span") == 1
    assert_examples_match_files(artifact.uri, span)


def test_bad_files_fail_the_run_naming_each_file_and_problem(tmp_path):
    data_root = tmp_path / "data"
    expected = bad_files(write_test_span(data_root))
    with pytest.raises(ValueError, match="3 bad input") as raised:
        run_pipeline(tmp_path, [ImageExampleGen(input_base=str(data_root))])
    for path, words in expected.items():
        assert f"{path} {words}" in str(raised.value)
    assert "Downstream" not in node_states(metadata_config(tmp_path))


def test_a_data_set_of_the_wrong_size_is_refused_naming_its_first_files(tmp_path):
    data_root = tmp_path / "data"
    span = write_test_span(data_root, size=28)  # all 30 images
    with pytest.raises(ValueError, match="30 bad input") as raised:
        run_pipeline(tmp_path, [ImageExampleGen(input_base=str(data_root))])
    listing = str(raised.value).split("allows skipping:\n")[1].split("\n")
    first = sorted(str(path) for path in span.glob("*/*/*.png"))[
        : image_example_gen.LISTED_BAD_INPUTS
    ]
    assert [line.split(" decodes to")[0].strip() for line in listing[:-1]] == first
    assert listing[-1].strip() == f"... and {30 - image_example_gen.LISTED_BAD_INPUTS} more"


@pytest.mark.slow
def test_max_bad_files_skips_bad_files_and_records_them(tmp_path, caplog):
    data_root = tmp_path / "data"
    span = write_test_span(data_root)
    expected = bad_files(span)
    caplog.set_level(logging.WARNING)
    config = run_pipeline(tmp_path, [ImageExampleGen(input_base=str(data_root), max_bad_files=3)])
    artifact = examples_artifact(config)
    assert artifact.get_int_custom_property(image_example_gen.SKIPPED_COUNT_PROPERTY) == 3
    recorded = artifact.get_json_value_custom_property(image_example_gen.SKIPPED_FILES_PROPERTY)
    assert len(recorded) == 3
    for path, words in expected.items():
        assert any(line.startswith(f"{path} {words}") for line in recorded)
    for path in expected:
        assert str(path) in caplog.text
    assert_examples_match_files(artifact.uri, span)


def test_unreadable_entries_and_huge_labels_are_bad_inputs_max_bad_files_skips(tmp_path):
    data_root = tmp_path / "data"
    span = write_test_span(data_root)
    broken = span / "train" / "1" / "broken.png"
    broken.symlink_to("/nonexistent/x.png")
    folder = span / "train" / "1" / "sub.png"
    folder.mkdir()
    huge = span / "train" / "99999999999999999999" / "x.png"
    huge.parent.mkdir()
    huge.write_bytes(png_bytes(digit_array(6)))
    config = run_pipeline(tmp_path, [ImageExampleGen(input_base=str(data_root), max_bad_files=3)])
    artifact = examples_artifact(config)
    assert artifact.get_json_value_custom_property(image_example_gen.SKIPPED_FILES_PROPERTY) == [
        f"{broken} cannot be read (No such file or directory)",
        f"{folder} cannot be read (Is a directory)",
        f"{huge} its folder name '99999999999999999999' is above 2**63-1, the largest int64 label",
    ]
    assert_examples_match_files(artifact.uri, span)


def test_a_bad_file_with_a_newline_in_its_name_counts_once(tmp_path):
    data_root = tmp_path / "data"
    span = write_test_span(data_root)
    bad = span / "train" / "4" / "two\nlines.png"
    bad.write_text("not an image")
    config = run_pipeline(tmp_path, [ImageExampleGen(input_base=str(data_root), max_bad_files=1)])
    artifact = examples_artifact(config)
    assert artifact.get_int_custom_property(image_example_gen.SKIPPED_COUNT_PROPERTY) == 1
    [line] = artifact.get_json_value_custom_property(image_example_gen.SKIPPED_FILES_PROPERTY)
    assert line.startswith(f"{bad} is not a PNG or JPEG file")


def test_a_file_name_that_is_not_utf8_fails_the_driver_naming_it(tmp_path):
    data_root = tmp_path / "data"
    span = write_test_span(data_root)
    name = bytes(span / "train" / "1") + b"/\xff.png"
    with open(name, "wb") as handle:
        handle.write(png_bytes(digit_array(7)))
    example_gen = ImageExampleGen(input_base=str(data_root))
    with pytest.raises(ValueError, match="has a name that is not UTF-8") as raised:
        image_example_gen._Driver(None).resolve_exec_properties(
            dict(example_gen.exec_properties), None, None
        )
    assert repr(name) in str(raised.value)
    assert "empty span" not in str(raised.value)


def test_a_span_above_int64_fails_the_driver_naming_its_files(tmp_path):
    data_root = tmp_path / "data"
    write_test_span(data_root, span=2**63, labels={"train": [1], "eval": [2]})
    example_gen = ImageExampleGen(input_base=str(data_root))
    with pytest.raises(ValueError) as raised:
        image_example_gen._Driver(None).resolve_exec_properties(
            dict(example_gen.exec_properties), None, None
        )
    assert str(raised.value) == (
        f"ImageExampleGen: span {2**63} ({data_root}/span-{2**63}/train/*/*, "
        f"{data_root}/span-{2**63}/eval/*/*) is above 2**63-1, the largest span ML Metadata "
        "records; renumber it"
    )


def test_an_empty_span_fails_with_a_clear_message(tmp_path):
    data_root = tmp_path / "data"
    write_test_span(data_root, labels={"train": [], "eval": []})
    with pytest.raises(ValueError, match="An empty span") as raised:
        run_pipeline(tmp_path, [ImageExampleGen(input_base=str(data_root))])
    assert "Cannot find matching for split train" in str(raised.value)
    assert "Downstream" not in node_states(metadata_config(tmp_path))


def test_a_stray_folder_beside_the_spans_fails_naming_it(tmp_path):
    data_root = tmp_path / "data"
    write_test_span(data_root)
    (data_root / "span-1").rename(data_root / "span-1-old")
    write_test_span(data_root)
    with pytest.raises(ValueError, match="cannot resolve the span") as raised:
        run_pipeline(tmp_path, [ImageExampleGen(input_base=str(data_root))])
    stray = rf"{data_root}/span-1-old/train/\d/\d{{6}}\.png"
    assert re.search(rf"Cannot find span number from {stray} based on", str(raised.value))
    assert "empty span" not in str(raised.value)


@pytest.mark.slow
def test_tfrecords_are_ingested_and_split_by_hash_buckets(tmp_path):
    records = tmp_path / "data" / "records"
    records.mkdir(parents=True)
    originals = []
    with tf.io.TFRecordWriter(
        str(records / "part-0.tfrecord.gz"), tf.io.TFRecordOptions(compression_type="GZIP")
    ) as writer:
        for index in range(40):
            image, label = png_bytes(digit_array(index)), index % 10
            example = tf.train.Example()
            example.features.feature["image"].bytes_list.value.append(image)
            example.features.feature["label"].int64_list.value.append(label)
            writer.write(example.SerializeToString())
            originals.append((image, label, "unknown", {}))
    example_gen = ImageExampleGen(
        input_base=str(tmp_path / "data"),
        input_config=example_gen_pb2.Input(
            splits=[example_gen_pb2.Input.Split(name="all", pattern="records/*")]
        ),
        output_config=example_gen_pb2.Output(
            split_config=example_gen_pb2.SplitConfig(
                splits=[
                    example_gen_pb2.SplitConfig.Split(name="train", hash_buckets=3),
                    example_gen_pb2.SplitConfig.Split(name="eval", hash_buckets=1),
                ]
            )
        ),
    )
    artifact = examples_artifact(run_pipeline(tmp_path, [example_gen]))
    train = [example_tuple(example) for example in read_examples(artifact.uri, "train")]
    evaluation = [example_tuple(example) for example in read_examples(artifact.uri, "eval")]
    assert train and evaluation
    assert sorted(train + evaluation) == sorted(originals)


# ---- span windows ----


@pytest.fixture(scope="module")
def window_run(tmp_path_factory):
    """Spans 1, 2 and 3 of different sizes; a window of 2 spans ingested at the newest."""
    tmp_path = tmp_path_factory.mktemp("window")
    data_root = tmp_path / "data"
    folders = {
        span: write_test_span(data_root, span, {"train": [span, 0] * span, "eval": [span]})
        for span in (1, 2, 3)
    }
    example_gen = ImageExampleGen(input_base=str(data_root), span_window=2)
    return folders, run_pipeline(tmp_path, [example_gen])


def test_a_window_ingests_each_of_its_spans_into_one_artifact(window_run):
    folders, config = window_run
    artifact = examples_artifact(config)
    assert artifact.get_int_custom_property("span") == 3
    assert image_example_gen.ingested_spans(artifact) == (2, 3)
    for split in ("train", "eval"):
        found = sorted(example_tuple(example) for example in read_examples(artifact.uri, split))
        expected = files_as_tuples(folders[2], split) + files_as_tuples(folders[3], split)
        assert found == sorted(expected)
    assert len(read_examples(artifact.uri, "train")) == 2 * 2 + 2 * 3
    assert node_states(config)["Downstream"] == [COMPLETE]


@pytest.mark.parametrize(
    "span_window, words",
    [
        (3, ["span_window=3 ending at span 1 would need spans -1..1, below span 0"]),
        (2, ["span 0: no files match {root}/span-0/train/*/*", "{root}/span-0/eval/*/*"]),
    ],
)
def test_a_window_below_the_first_span_fails_naming_it(tmp_path, span_window, words):
    data_root = tmp_path / "data"
    write_test_span(data_root, span=1)
    example_gen = ImageExampleGen(input_base=str(data_root), span_window=span_window)
    with pytest.raises(ValueError) as raised:
        run_pipeline(tmp_path, [example_gen])
    for word in words:
        assert word.format(root=data_root) in str(raised.value)
    assert "Downstream" not in node_states(metadata_config(tmp_path))


def test_a_window_with_a_missing_split_of_an_older_span_fails_naming_it(tmp_path):
    data_root = tmp_path / "data"
    write_test_span(data_root, span=1)
    write_test_span(data_root, span=2, labels={"train": [1, 2]})  # no eval split
    write_test_span(data_root, span=3)
    example_gen = ImageExampleGen(input_base=str(data_root), span_window=3)
    with pytest.raises(ValueError, match=r"span window 1\.\.3 needs every split") as raised:
        run_pipeline(tmp_path, [example_gen])
    [missing] = str(raised.value).splitlines()[1:]
    assert missing.strip() == f"span 2: no files match {data_root}/span-2/eval/*/*"


def test_the_fingerprint_of_a_window_covers_its_spans_only(tmp_path):
    data_root = tmp_path / "data"
    for span in (1, 2, 3):
        write_test_span(data_root, span=span)
    example_gen = ImageExampleGen(input_base=str(data_root), span_window=2)

    def fingerprint():
        driver = image_example_gen._Driver(None)
        resolved = driver.resolve_exec_properties(dict(example_gen.exec_properties), None, None)
        return resolved["input_fingerprint"]

    before = fingerprint()
    assert [line.split(",")[:2] for line in before.splitlines()] == [
        ["span:2", "split:train"],
        ["span:3", "split:train"],
        ["span:2", "split:eval"],
        ["span:3", "split:eval"],
    ]
    (data_root / "span-1" / "eval" / "0" / "extra.png").write_bytes(png_bytes(digit_array(5)))
    assert fingerprint() == before  # span 1 is outside the window
    (data_root / "span-2" / "eval" / "0" / "extra.png").write_bytes(png_bytes(digit_array(5)))
    assert fingerprint() != before


def test_a_cached_run_reruns_when_a_file_moves_to_another_label_or_the_manifest_changes(tmp_path):
    data_root = tmp_path / "data"
    span = write_test_span(data_root, labels={"train": [1, 2], "eval": [3]})

    def ingest():
        """(state of this run's ImageExampleGen, sorted (label, variant) of its train split)."""
        example_gen = ImageExampleGen(input_base=str(data_root))
        config = run_pipeline(tmp_path, [example_gen], enable_cache=True)
        store = metadata_store.MetadataStore(config)
        [execution, *_] = sorted(
            store.get_executions_by_type(ImageExampleGen.get_class_type()), key=lambda e: -e.id
        )
        [event] = [
            e for e in store.get_events_by_execution_ids([execution.id]) if e.type in OUTPUTS
        ]
        [examples] = store.get_artifacts_by_id([event.artifact_id])
        train = [example_tuple(example)[1:3] for example in read_examples(examples.uri, "train")]
        return execution.last_known_state, sorted(train)

    assert ingest() == (COMPLETE, [(1, "rts"), (2, "rts")])
    assert ingest()[0] == CACHED
    (span / "train" / "5").mkdir()
    (span / "train" / "2" / "000001.png").rename(
        span / "train" / "5" / "000001.png"
    )  # same size, mtime
    assert ingest() == (COMPLETE, [(1, "rts"), (5, "unknown")])  # no longer in the manifest
    manifest = span / "manifest.csv"
    edited = manifest.read_bytes().replace(b",rts,", b",rst,")
    assert len(edited) == manifest.stat().st_size  # bytes: text mode would drop the CRs
    manifest.write_bytes(edited)  # same size and path: the mtime tells
    assert ingest() == (COMPLETE, [(1, "rst"), (5, "unknown")])
    assert ingest()[0] == CACHED


def test_a_window_whose_older_span_breaks_the_schema_stops_at_the_gate(tmp_path):
    data_root = tmp_path / "data"
    write_test_span(data_root, span=1, labels={"train": [*range(10), 11], "eval": list(range(10))})
    write_test_span(data_root, span=2)
    example_gen = ImageExampleGen(input_base=str(data_root), span_window=2)
    validation = build_validation(example_gen.outputs["examples"])
    with pytest.raises(DataValidationError, match="feature 'label': Out-of-range values"):
        run_pipeline(tmp_path, [example_gen, *validation.components()])
    assert "Downstream" not in node_states(metadata_config(tmp_path))
