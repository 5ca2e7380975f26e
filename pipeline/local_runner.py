"""Runs the pipeline on one machine: LocalDagRunner, ML Metadata in SQLite, Beam's DirectRunner.

Layout under the home directory: ``metadata.sqlite``, ``pipeline_root/``, ``serving/``.
"""

import logging
import os

from tfx import v1 as tfx

from pipeline.pipeline import create_pipeline

logger = logging.getLogger(__name__)


def local_pipeline(config):
    """`create_pipeline(config)` wired to ``<home>/metadata.sqlite``."""
    os.makedirs(config.home_dir, exist_ok=True)
    metadata = tfx.orchestration.metadata.sqlite_metadata_connection_config(config.metadata_path)
    return create_pipeline(config, metadata, config.beam_pipeline_args())


def component_ids(pipeline):
    """The pipeline's component ids in the order the local runner runs them."""
    return [component.id for component in pipeline.components]


def run_local(pipeline):
    """Run `pipeline` with LocalDagRunner; a failing component raises its error.

    TFX records a component FAILED in ML Metadata when its executor fails, but leaves it
    RUNNING when its driver does (ImageExampleGen finding no span to ingest); that one is
    recorded FAILED here, so the summary and `report` do not call the run going or killed.
    """
    from ml_metadata.metadata_store import metadata_store

    store = metadata_store.MetadataStore(pipeline.metadata_connection_config)
    earlier_runs = {run.id for run in store.get_contexts_by_type("pipeline_run")}
    try:
        tfx.orchestration.LocalDagRunner().run(pipeline)
    except Exception:
        try:
            _record_unfinished_as_failed(store, earlier_runs)
        except Exception:  # the record must not hide the run's own error
            logger.warning("could not record the failed run in ML Metadata", exc_info=True)
        raise


def _record_unfinished_as_failed(store, earlier_runs):
    """Mark FAILED the executions of the new run(s) that a failure left NEW or RUNNING."""
    from ml_metadata.proto import metadata_store_pb2

    state = metadata_store_pb2.Execution
    for run in store.get_contexts_by_type("pipeline_run"):
        if run.id in earlier_runs:
            continue
        unfinished = [
            execution
            for execution in store.get_executions_by_context(run.id)
            if execution.last_known_state in (state.NEW, state.RUNNING)
        ]
        for execution in unfinished:
            execution.last_known_state = state.FAILED
        if unfinished:
            store.put_executions(unfinished)
