"""The validation part of the pipeline: statistics, schema, ExampleValidator and the gate.

    examples -> StatisticsGen (image-aware) -> ImportSchemaGen (curated: CuratedSchemaGen)
             or SchemaGen (inferred)
             -> ExampleValidator -> AnomalyGate

The trainer must depend on the gate: `trainer.add_upstream_node(nodes.gate)`.
"""

import dataclasses
import hashlib
from pathlib import Path
from typing import ClassVar

import tensorflow_data_validation as tfdv
from tfx import types
from tfx.components import ExampleValidator, SchemaGen, StatisticsGen
from tfx.components.schema_gen.import_schema_gen.component import ImportSchemaGen
from tfx.dsl.components.base import base_component
from tfx.types import standard_artifacts
from tfx.types.component_spec import ExecutionParameter
from tfx.types.standard_component_specs import ImportSchemaGenSpec

from components.gate import AnomalyGate

SCHEMA_FILE = Path(__file__).resolve().parent / "schema" / "schema.pbtxt"


class _CuratedSchemaSpec(ImportSchemaGenSpec):
    PARAMETERS: ClassVar = {
        **ImportSchemaGenSpec.PARAMETERS,
        "schema_sha256": ExecutionParameter(type=str),
    }


class CuratedSchemaGen(ImportSchemaGen):
    """ImportSchemaGen whose cache key holds the schema's content, not only its path: an edited
    schema is imported again, so new spans are checked against it."""

    SPEC_CLASS = _CuratedSchemaSpec

    def __init__(self, schema_file):
        spec = _CuratedSchemaSpec(
            schema_file=str(schema_file),
            schema_sha256=hashlib.sha256(Path(schema_file).read_bytes()).hexdigest(),
            schema=types.Channel(type=standard_artifacts.Schema),
        )
        base_component.BaseComponent.__init__(self, spec=spec)


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
        stats_options=tfdv.StatsOptions(enable_semantic_domain_stats=True),
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
        num_classes=num_classes,
    )
    return ValidationNodes(statistics_gen, schema_gen, example_validator, gate)
