"""Validation: ImageExampleGen -> StatisticsGen -> ImportSchemaGen -> ExampleValidator -> gate.

Real components under LocalDagRunner; a `Downstream` sentinel after the gate shows whether
anything downstream ran.
"""

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from PIL import Image
from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2, statistics_pb2
from test_image_example_gen import (
    CACHED,
    COMPLETE,
    artifact_of,
    metadata_config,
    node_states,
    run_pipeline,
    write_test_span,
)
from tfx.components import SchemaGen
from tfx.components.statistics_gen.stats_artifact_utils import load_statistics
from tfx.types import artifact_utils, standard_artifacts

from components.gate import (
    DataValidationError,
    anomaly_problems,
    leak_problems,
    statistics_problems,
)
from components.image_example_gen import ImageExampleGen
from pipeline import summary
from pipeline.configs import PipelineConfig
from pipeline.validation import SCHEMA_FILE, build_validation

# TFDV describes a bytes feature as images only from 100 values on (ImageStatsGenerator's
# values_threshold), so the clean span has 100 images per split.
CLEAN_LABELS = {"train": list(range(10)) * 10, "eval": list(range(10)) * 10}


def validation_pipeline(tmp_path, labels, num_classes=10):
    """Writes span 1 with `labels`, runs ingestion + validation + Downstream; (config, nodes)."""
    data_root = tmp_path / "data"
    write_test_span(data_root, labels=labels)
    example_gen = ImageExampleGen(input_base=str(data_root))
    nodes = build_validation(example_gen.outputs["examples"], num_classes=num_classes)
    return run_pipeline(tmp_path, [example_gen, *nodes.components()]), nodes


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    config, _ = validation_pipeline(tmp_path_factory.mktemp("clean"), CLEAN_LABELS)
    return config


def test_a_clean_span_passes_the_gate_and_downstream_runs(clean_run):
    states = node_states(clean_run)
    for node in ("StatisticsGen", "ImportSchemaGen", "ExampleValidator", "AnomalyGate"):
        assert states[node] == [COMPLETE], node
    assert states["Downstream"] == [COMPLETE]


def test_statistics_describe_the_image_bytes_as_png_images(clean_run):
    statistics = artifact_of(clean_run, standard_artifacts.ExampleStatistics)
    for split in ("train", "eval"):
        dataset = load_statistics(statistics, split).proto().datasets[0]
        assert dataset.num_examples == 100
        [image] = [feature for feature in dataset.features if feature.path.step == ["image"]]
        custom = {stat.name: stat for stat in image.custom_stats}
        assert custom["domain_info"].str == "image_domain {}"
        buckets = custom["image_format_histogram"].rank_histogram.buckets
        assert [(bucket.label, bucket.sample_count) for bucket in buckets] == [("png", 100)]


def test_a_clean_span_has_no_anomalies(clean_run):
    anomalies = artifact_of(clean_run, standard_artifacts.ExampleAnomalies)
    for split in ("train", "eval"):
        path = f"{anomalies.uri}/Split-{split}/SchemaDiff.pb"
        with open(path, "rb") as handle:
            assert anomaly_problems(anomalies_pb2.Anomalies.FromString(handle.read()), split) == []


def test_an_edited_schema_is_imported_again_in_a_cached_run(tmp_path):
    schema_file = tmp_path / "schema.pbtxt"
    schema_file.write_text(SCHEMA_FILE.read_text())
    write_test_span(tmp_path / "data", labels={"train": [1, 2, 3], "eval": [3]})

    def run():
        example_gen = ImageExampleGen(input_base=str(tmp_path / "data"))
        schema_gen = build_validation(example_gen.outputs["examples"], schema_file).schema_gen
        config = run_pipeline(tmp_path, [example_gen, schema_gen], enable_cache=True)
        return node_states(config)["ImportSchemaGen"][0]  # the newest first

    assert run() == COMPLETE
    assert run() == CACHED
    schema_file.write_text(SCHEMA_FILE.read_text().replace("max: 9", "max: 3"))
    assert run() == COMPLETE


@pytest.mark.slow
def test_a_label_outside_the_schema_domain_stops_the_pipeline(tmp_path):
    labels = {"train": [*range(10), 11], "eval": list(range(10))}
    with pytest.raises(DataValidationError) as raised:
        validation_pipeline(tmp_path, labels)
    message = str(raised.value)
    assert "split 'train', feature 'label': Out-of-range values" in message
    assert "11" in message
    assert "split 'eval'" not in message
    assert "Downstream" not in node_states(metadata_config(tmp_path))


@pytest.mark.slow
def test_a_train_split_of_a_single_class_stops_the_pipeline(tmp_path):
    labels = {"train": [3] * 12, "eval": list(range(10))}
    with pytest.raises(DataValidationError) as raised:
        validation_pipeline(tmp_path, labels)
    problem = "split 'train' holds a single class: every 'label' is 3"
    assert problem in str(raised.value)
    assert "Downstream" not in node_states(metadata_config(tmp_path))
    config = PipelineConfig(home=str(tmp_path), pipeline_name="test")
    assert problem in summary.format_report(summary.run_report(config))  # not "anomalies: none"


@pytest.mark.slow
def test_a_train_split_without_a_class_stops_the_pipeline(tmp_path):
    labels = {"train": [label for label in range(10) if label != 4] * 2, "eval": list(range(10))}
    with pytest.raises(DataValidationError) as raised:
        validation_pipeline(tmp_path, labels)
    assert "split 'train' has no examples of 'label' 4: the model would never learn" in str(
        raised.value
    )
    assert "Downstream" not in node_states(metadata_config(tmp_path))


@pytest.mark.slow
def test_a_split_of_one_image_repeated_stops_the_pipeline(tmp_path):
    span = write_test_span(tmp_path / "data", labels=CLEAN_LABELS)
    black = span / "black.png"
    Image.fromarray(np.zeros((42, 42), np.uint8)).save(black)
    for path in (span / "eval").glob("*/*.png"):
        path.write_bytes(black.read_bytes())
    black.unlink()
    example_gen = ImageExampleGen(input_base=str(tmp_path / "data"))
    nodes = build_validation(example_gen.outputs["examples"])
    with pytest.raises(DataValidationError) as raised:
        run_pipeline(tmp_path, [example_gen, *nodes.components()])
    message = str(raised.value)
    assert "split 'eval' holds one image 100 times: every 'image' is the same" in message
    assert "split 'train'" not in message


@pytest.mark.slow
def test_eval_images_that_are_train_images_stop_the_pipeline(tmp_path):
    span = write_test_span(tmp_path / "data", labels=CLEAN_LABELS)
    for index in range(3):  # three eval images replaced by copies of train images
        train_image = next((span / "train" / str(index)).glob("*.png"))
        eval_image = next((span / "eval" / str(index)).glob("*.png"))
        eval_image.write_bytes(train_image.read_bytes())
    example_gen = ImageExampleGen(input_base=str(tmp_path / "data"))
    nodes = build_validation(example_gen.outputs["examples"])
    with pytest.raises(DataValidationError) as raised:
        run_pipeline(tmp_path, [example_gen, *nodes.components()])
    assert "split 'eval' holds 3 image(s) that split 'train' holds too" in str(raised.value)
    config = PipelineConfig(home=str(tmp_path), pipeline_name="test")
    assert "split 'eval' holds 3 image(s)" in summary.format_report(summary.run_report(config))


@pytest.mark.slow
def test_labels_the_model_has_no_output_for_stop_the_pipeline(tmp_path):
    labels = {"train": list(range(10)), "eval": list(range(5))}
    with pytest.raises(DataValidationError) as raised:
        validation_pipeline(tmp_path, labels, num_classes=5)
    message = str(raised.value)
    assert "split 'train' has 'label' 9, but the model has 5 classes (0 to 4)" in message
    assert "split 'eval'" not in message
    assert "Downstream" not in node_states(metadata_config(tmp_path))


@pytest.mark.slow
def test_an_eval_split_whose_images_were_all_skipped_stops_the_pipeline(tmp_path):
    span = write_test_span(tmp_path / "data", labels={"train": [1, 2], "eval": [1, 2]})
    for path in (span / "eval").glob("*/*.png"):
        path.write_bytes(b"not an image")
    example_gen = ImageExampleGen(input_base=str(tmp_path / "data"), max_bad_files=2)
    nodes = build_validation(example_gen.outputs["examples"])
    with pytest.raises(DataValidationError) as raised:
        run_pipeline(tmp_path, [example_gen, *nodes.components()])
    assert "split 'eval' holds no examples (were all its inputs skipped as bad" in str(raised.value)


# ---- the gate's wording and checks (no pipeline) ----


def test_anomaly_problems_lists_every_reason_with_feature_and_description():
    anomalies = text_format.Parse(
        """
        anomaly_info {
          key: "label"
          value {
            short_description: "Multiple errors"
            reason { type: INT_TYPE_BIG_INT short_description: "Out-of-range values"
                     description: "Unexpectedly large value: 11." }
            reason { type: FEATURE_TYPE_LOW_FRACTION_PRESENT
                     short_description: "Column dropped"
                     description: "The feature was present in fewer examples than expected." }
          }
        }
        anomaly_info {
          key: "image"
          value { short_description: "Not an image" description: "Some values are text."
                  reason { type: UNKNOWN_TYPE } }
        }
        anomaly_info {
          key: "variant"
          value { short_description: "Unexpected string values"
                  description: "Examples contain values missing from the schema: x." }
        }
        """,
        anomalies_pb2.Anomalies(),
    )
    assert anomaly_problems(anomalies, "eval") == [
        "split 'eval', feature 'image': Not an image: Some values are text.",
        "split 'eval', feature 'label': Out-of-range values: Unexpectedly large value: 11. "
        "[INT_TYPE_BIG_INT]",
        "split 'eval', feature 'label': Column dropped: The feature was present in fewer "
        "examples than expected. [FEATURE_TYPE_LOW_FRACTION_PRESENT]",
        "split 'eval', feature 'variant': Unexpected string values: Examples contain values "
        "missing from the schema: x.",
    ]


def label_statistics(num_examples, low, high):
    return text_format.Parse(
        f"""
        num_examples: {num_examples}
        features {{ path {{ step: "label" }} type: INT num_stats {{ min: {low} max: {high} }} }}
        """,
        statistics_pb2.DatasetFeatureStatistics(),
    )


def test_statistics_problems_find_empty_splits_and_single_class_train_splits():
    assert statistics_problems(label_statistics(0, 0, 0), "eval", "label", False) == [
        "split 'eval' holds no examples (were all its inputs skipped as bad, or empty?)"
    ]
    [single] = statistics_problems(label_statistics(50, 7, 7), "train", "label", True)
    assert single.startswith("split 'train' holds a single class: every 'label' is 7;")
    assert statistics_problems(label_statistics(50, 0, 9), "train", "label", True) == []
    # Only the train split must hold several classes.
    assert statistics_problems(label_statistics(5, 7, 7), "eval", "label", False) == []
    assert statistics_problems(label_statistics(5, 0, 9), "train", "digit", True) == [
        "split 'train' has no statistics for the label feature 'digit'"
    ]
    # Every split's labels must be below num_classes.
    assert statistics_problems(label_statistics(5, 0, 9), "eval", "label", False, 10) == []
    [past] = statistics_problems(label_statistics(5, 0, 3), "eval", "label", False, 3)
    assert past.startswith("split 'eval' has 'label' 3, but the model has 3 classes (0 to 2);")
    assert len(statistics_problems(label_statistics(5, 3, 3), "train", "label", True, 3)) == 2


def class_statistics(num_examples, counts):
    """A split's statistics with a categorical label: {label: count}, as TFDV counts them."""
    buckets = "".join(
        f'buckets {{ label: "{label}" sample_count: {count} }}' for label, count in counts.items()
    )
    return text_format.Parse(
        f"""
        num_examples: {num_examples}
        features {{ path {{ step: "label" }} type: INT
                   string_stats {{ unique: {len(counts)} rank_histogram {{ {buckets} }} }} }}
        """,
        statistics_pb2.DatasetFeatureStatistics(),
    )


def test_statistics_problems_find_classes_missing_from_the_train_split():
    every = class_statistics(50, {label: 5 for label in range(10)})
    assert statistics_problems(every, "train", "label", True, 10) == []
    without = class_statistics(40, {label: 5 for label in range(10) if label not in (3, 7)})
    assert statistics_problems(without, "train", "label", True, 10) == [
        "split 'train' has no examples of 'label' 3, 7: the model would never learn those classes"
    ]
    assert statistics_problems(without, "eval", "label", False, 10) == []  # eval may lack some
    [past] = statistics_problems(class_statistics(9, {2: 4, 12: 5}), "eval", "label", False, 10)
    assert past.startswith("split 'eval' has 'label' 12, but the model has 10 classes")
    [single] = statistics_problems(class_statistics(9, {6: 9}), "train", "label", True, 10)
    assert single.startswith("split 'train' holds a single class: every 'label' is 6;")


def test_statistics_problems_find_a_split_of_one_image_repeated():
    statistics = class_statistics(30, {label: 3 for label in range(10)})
    image = statistics.features.add(type=statistics_pb2.FeatureNameStatistics.STRING)
    image.path.step.append("image")
    image.string_stats.unique = 1
    assert statistics_problems(statistics, "eval", "label", False, 10) == [
        "split 'eval' holds one image 30 times: every 'image' is the same (all black, or one "
        "file copied?)"
    ]
    image.string_stats.unique = 2
    assert statistics_problems(statistics, "eval", "label", False, 10) == []
    statistics.num_examples = 1  # one example is one image
    image.string_stats.unique = 1
    assert statistics_problems(statistics, "eval", "label", False, 10) == []


def examples_artifact_of(folder, images):
    """An Examples artifact at `folder` whose splits hold examples of `images`:
    {split: [image bytes]}."""
    for split, split_images in images.items():
        (folder / f"Split-{split}").mkdir(parents=True)
        path = str(folder / f"Split-{split}" / "data_tfrecord-00000-of-00001.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for image in split_images:
                feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))
                example = tf.train.Example(features=tf.train.Features(feature={"image": feature}))
                writer.write(example.SerializeToString())
    examples = standard_artifacts.Examples()
    examples.uri = str(folder)
    examples.split_names = artifact_utils.encode_split_names(list(images))
    return examples


def test_leak_problems_count_the_eval_images_the_train_split_holds(tmp_path):
    images = {"train": [b"a", b"b", b"c"], "eval": [b"b", b"d", b"b", b"a"]}
    assert leak_problems(examples_artifact_of(tmp_path / "leak", images)) == [
        "split 'eval' holds 3 image(s) that split 'train' holds too (identical files): its "
        "accuracy would count images the model trained on"
    ]
    apart = {"train": [b"a", b"a"], "eval": [b"b", b"c"]}
    assert leak_problems(examples_artifact_of(tmp_path / "apart", apart)) == []


def test_the_curated_schema_states_the_data_contract():
    schema = text_format.Parse(SCHEMA_FILE.read_text(), schema_pb2.Schema())
    features = {feature.name: feature for feature in schema.feature}
    assert set(features) == {"image", "label", "variant", "distortion"}
    assert (features["label"].int_domain.min, features["label"].int_domain.max) == (0, 9)
    assert features["label"].int_domain.is_categorical  # so the statistics count every class
    assert features["image"].HasField("image_domain")
    assert set(features["variant"].string_domain.value) == {"r", "rts", "p", "e", "unknown"}
    for feature in features.values():
        assert feature.presence.min_fraction == 1.0, feature.name


def test_build_validation_infers_the_schema_when_asked(tmp_path):
    example_gen = ImageExampleGen(input_base=str(tmp_path))
    nodes = build_validation(example_gen.outputs["examples"], infer_schema=True)
    assert isinstance(nodes.schema_gen, SchemaGen)
    assert nodes.example_validator.inputs["schema"] is nodes.schema_gen.outputs["schema"]
    with pytest.raises(ValueError, match=r"schema_file .*missing\.pbtxt does not exist"):
        build_validation(example_gen.outputs["examples"], schema_file=tmp_path / "missing.pbtxt")
