"""The validation part of the pipeline: statistics, schema, ExampleValidator and the gate.

    examples -> StatisticsGen (image-aware) -> ImportSchemaGen (curated) or SchemaGen (inferred)
             -> ExampleValidator -> AnomalyGate

The trainer must depend on the gate: `trainer.add_upstream_node(nodes.gate)`.
"""

import dataclasses
from pathlib import Path

import tensorflow_data_validation as tfdv
from tfx.components import ExampleValidator, SchemaGen, StatisticsGen
from tfx.components.schema_gen.import_schema_gen.component import ImportSchemaGen

from components.gate import AnomalyGate

SCHEMA_FILE = Path(__file__).resolve().parent / "schema" / "schema.pbtxt"


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


def build_validation(examples, schema_file=SCHEMA_FILE, infer_schema=False):
    """ValidationNodes over an `examples` channel (ImageExampleGen's `outputs['examples']`).

    `schema_file`: the curated schema ImportSchemaGen imports; `infer_schema=True` infers one
    with SchemaGen instead (useful to draft a schema for a new data set).
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
        schema_gen = ImportSchemaGen(schema_file=str(schema_file))
    example_validator = ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"]
    )
    gate = AnomalyGate(
        anomalies=example_validator.outputs["anomalies"],
        statistics=statistics_gen.outputs["statistics"],
    )
    return ValidationNodes(statistics_gen, schema_gen, example_validator, gate)
