"""Each training worker's own part of the examples (MultiWorkerMirroredStrategy Trainer modules).

Use it inside `strategy.distribute_datasets_from_function(fn)`: `fn(input_context)` calls
`worker_records(fn_args.train_files, input_context)`. Every worker reads all files and keeps
every N-th record starting at its own index (DATA sharding), so the shards are disjoint, cover
every record and differ in size by one record at most. Splitting the files instead (FILE
sharding) would give shards as uneven as the files (with 3 files and 2 workers, one worker holds
twice as many records as the other), and as every worker runs the same number of steps, the
smaller shard's examples would be trained on twice as often. The dataset's auto-sharding is
switched off because the sharding is done here, and the shard is logged so each worker's log
says what it read.
"""

import logging

import tensorflow as tf

log = logging.getLogger(__name__)


def list_files(file_patterns: list[str]) -> list[str]:
    """The sorted files matched by the Trainer's file patterns (e.g. `.../Split-train/*`)."""
    files = sorted({f for pattern in file_patterns for f in tf.io.gfile.glob(pattern)})
    if not files:
        raise ValueError(f"no files match the patterns {file_patterns}")
    return files


def worker_records(
    file_patterns: list[str],
    input_context: tf.distribute.InputContext,
    compression: str = "GZIP",
) -> tf.data.Dataset:
    """Serialized records of this worker's shard, in file order."""
    files = list_files(file_patterns)
    count, index = input_context.num_input_pipelines, input_context.input_pipeline_id
    records = tf.data.TFRecordDataset(files, compression_type=compression).shard(count, index)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    log.info(
        "input shard %d of %d by DATA, record %d, %d, ... of %d file(s): %s",
        index,
        count,
        index,
        index + count,
        len(files),
        ", ".join(files),
    )
    return records.with_options(options)
