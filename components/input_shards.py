"""Each training worker's own part of the examples (MultiWorkerMirroredStrategy Trainer modules).

Use it inside `strategy.distribute_datasets_from_function(fn)`: `fn(input_context)` calls
`worker_records(fn_args.train_files, input_context)`. With at least as many files as workers,
the workers split the files (FILE sharding); with fewer, every worker reads all files and keeps
every N-th record starting at its own index (DATA sharding). The dataset's auto-sharding is
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
    if len(files) >= count:
        mine = files[index::count]
        records = tf.data.TFRecordDataset(mine, compression_type=compression)
        how = f"FILE, {len(mine)} of {len(files)} files: {', '.join(mine)}"
    else:
        records = tf.data.TFRecordDataset(files, compression_type=compression)
        records = records.shard(count, index)
        how = f"DATA, record {index}, {index + count}, ... of {len(files)} file(s): {files[0]}"
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    log.info("input shard %d of %d by %s", index, count, how)
    return records.with_options(options)
