"""The validation part of the pipeline: statistics, schema, ExampleValidator and the gate.

    examples -> StatisticsGen (image-aware) -> ImportSchemaGen (curated: CuratedSchemaGen)
             or SchemaGen (inferred)
             -> ExampleValidator -> AnomalyGate

The trainer must depend on the gate: `trainer.add_upstream_node(nodes.gate)`.
"""

import dataclasses
import os
from pathlib import Path
from typing import ClassVar

import tensorflow_data_validation as tfdv
from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx import types
from tfx.components import ExampleValidator, SchemaGen, StatisticsGen
from tfx.components.schema_gen import executor as schema_gen_executor
from tfx.components.schema_gen.import_schema_gen.component import ImportSchemaGen
from tfx.dsl.components.base import base_component, base_executor, executor_spec
from tfx.dsl.io import fileio
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ExecutionParameter
from tfx.types.standard_component_specs import ImportSchemaGenSpec

from components.gate import AnomalyGate

SCHEMA_FILE = Path(__file__).resolve().parent / "schema" / "schema.pbtxt"


class _CuratedSchemaSpec(ImportSchemaGenSpec):
    PARAMETERS: ClassVar = {
        **ImportSchemaGenSpec.PARAMETERS,
        "schema_text": ExecutionParameter(type=str),
    }


class CuratedSchemaExecutor(base_executor.BaseExecutor):
    """Writes the schema text the component carries (a compiled step needs no file of the
    machine that compiled it), after checking that it parses as a Schema."""

    def Do(self, input_dict, output_dict, exec_properties):
        text = exec_properties["schema_text"]
        text_format.Parse(text, schema_pb2.Schema())
        folder = artifact_utils.get_single_uri(output_dict["schema"])
        fileio.makedirs(folder)
        path = os.path.join(folder, schema_gen_executor.DEFAULT_FILE_NAME)  # what readers expect
        with fileio.open(path, "w") as handle:
            handle.write(text)


class CuratedSchemaGen(ImportSchemaGen):
    """ImportSchemaGen that carries the schema's text, not only its path: an edited schema is
    imported again in a cached run, and a Kubeflow step imports it where the file is absent."""

    SPEC_CLASS = _CuratedSchemaSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(CuratedSchemaExecutor)

    def __init__(self, schema_file):
        spec = _CuratedSchemaSpec(
            schema_file=str(schema_file),
            schema_text=Path(schema_file).read_text(),
            schema=types.Channel(type=standard_artifacts.Schema),
        )
        base_component.BaseComponent.__init__(self, spec=spec)


def _categorical_features(schema_file):
    """The schema of `schema_file` with its categorical features alone, for StatisticsGen: it
    counts their values (the examples of every class) and describes the other features as
    without a schema (the image bytes as strings, whose distinct values it counts)."""
    schema = text_format.Parse(Path(schema_file).read_text(), schema_pb2.Schema())
    categorical = [feature for feature in schema.feature if feature.int_domain.is_categorical]
    del schema.feature[:]
    schema.feature.extend(categorical)
    return schema


@dataclasses.dataclass(frozen=True)
class ValidationNodes:
    """The validation components, in pipeline order."""

    statistics_gen: StatisticsGen
    schema_gen: ImportSchemaGen | SchemaGen
    example_validator: ExampleValidator
    gate: object  # the AnomalyGate component instance

    def components(self):
        """The nodes as a list for `tfx.dsl.Pipeline(components=...)`."""
        return [self.statistics_gen, self.schema_gen, self.example_validator, self.gate]


def build_validation(examples, schema_file=SCHEMA_FILE, infer_schema=False, num_classes=10):
    """ValidationNodes over an `examples` channel (ImageExampleGen's `outputs['examples']`).

    `schema_file`: the curated schema ImportSchemaGen imports; `infer_schema=True` infers one
    with SchemaGen instead (useful to draft a schema for a new data set). `num_classes`: the
    model's outputs; the gate stops labels at or above it.
    """
    if not infer_schema and not Path(schema_file).is_file():
        raise ValueError(f"schema_file {schema_file} does not exist")
    statistics_gen = StatisticsGen(
        examples=examples,
        # Semantic-domain stats describe the `image` bytes as images (formats, image domain).
        stats_options=tfdv.StatsOptions(
            enable_semantic_domain_stats=True,
            schema=None if infer_schema else _categorical_features(schema_file),
        ),
    )
    if infer_schema:
        schema_gen = SchemaGen(statistics=statistics_gen.outputs["statistics"])
    else:
        schema_gen = CuratedSchemaGen(schema_file).with_id("ImportSchemaGen")
    example_validator = ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"]
    )
    gate = AnomalyGate(
        anomalies=example_validator.outputs["anomalies"],
        statistics=statistics_gen.outputs["statistics"],
        examples=examples,
        num_classes=num_classes,
    )
    return ValidationNodes(statistics_gen, schema_gen, example_validator, gate)
