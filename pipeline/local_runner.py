"""Runs the pipeline on one machine: LocalDagRunner, ML Metadata in SQLite, Beam's DirectRunner.

Layout under the home directory: ``metadata.sqlite``, ``pipeline_root/``, ``serving/``.
"""

import os

from tfx import v1 as tfx

from pipeline.pipeline import create_pipeline


def local_pipeline(config):
    """`create_pipeline(config)` wired to ``<home>/metadata.sqlite``."""
    os.makedirs(config.home_dir, exist_ok=True)
    metadata = tfx.orchestration.metadata.sqlite_metadata_connection_config(config.metadata_path)
    return create_pipeline(config, metadata, config.beam_pipeline_args())


def component_ids(pipeline):
    """The pipeline's component ids in the order the local runner runs them."""
    return [component.id for component in pipeline.components]


def run_local(pipeline):
    """Run `pipeline` with LocalDagRunner; a failing component raises its error."""
    tfx.orchestration.LocalDagRunner().run(pipeline)
