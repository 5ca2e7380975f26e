"""Multi-worker training throughput: the project's Trainer module on 1 and 2 local workers.

Each row trains `stn_model.trainer.run_fn` (ST-CNN, affine) through the multi-worker
executor (`components.multiworker_trainer`, local backend: worker processes talking gRPC over
loopback) at the same global batch, on synthetic 42x42 PNG examples. Every configuration runs
twice, for a short and a long number of steps, each in a fresh process; the throughput is
(extra steps x global batch) / (extra seconds), so process start-up, graph building and
export cancel out; the extra steps must take at least a quarter of the short run's time, or
start-up jitter (half a second here) would swamp them. "x" is this row's throughput over the
1-worker row's. CPU s counts all processes of the long run; peak RSS is that of its largest
process (a worker).

On a machine with 2 cores, 2 workers cannot be faster than 1: both share the same cores and
add gRPC all-reduce traffic. The numbers show the cost of distribution, not a speed-up.

    .venv/bin/python benchmarks/bench_multiworker.py [--steps 8 160] [--global-batch 64]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _util import peak_rss_mib, print_table

import components  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

TRAIN_EXAMPLES = 2048
IMAGE_SIZE = 42
MIN_EXTRA_SHARE = 0.25  # of the short run's seconds that the extra steps must take at least


def write_examples(root: Path, count: int) -> None:
    """Split-train / Split-eval gzipped tf.Examples of random 42x42 grey PNGs, labels 0..9."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("eval", 256)):
        (root / f"Split-{split}").mkdir(parents=True)
        path = str(root / f"Split-{split}" / "data_tfrecord-00000-of-00001.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for i in range(n):
                pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8)
                feature = {
                    "image": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[tf.io.encode_png(pixels).numpy()])
                    ),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 10])),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())


def train_once(examples_root: str, workdir: str, workers: int, steps: int, global_batch: int):
    """One executor run in this process; -> dict of seconds, CPU seconds and peak RSS."""
    from tfx.proto import trainer_pb2
    from tfx.types import artifact_utils, standard_artifacts
    from tfx.utils import json_utils, proto_utils

    from components.multiworker_config import CONFIG_KEY, MultiWorkerConfig
    from components.multiworker_trainer import MultiWorkerExecutor

    examples = standard_artifacts.Examples()
    examples.uri = examples_root
    examples.split_names = artifact_utils.encode_split_names(["train", "eval"])
    model, model_run = standard_artifacts.Model(), standard_artifacts.ModelRun()
    model.uri, model_run.uri = f"{workdir}/model", f"{workdir}/model_run"
    custom = {
        "model": "st_cnn_affine",
        "batch_size": global_batch // workers,
        "shuffle_buffer": 256,
        CONFIG_KEY: MultiWorkerConfig(num_workers=workers, max_restarts=0).to_dict(),
    }
    properties = {
        "train_args": proto_utils.proto_to_json(trainer_pb2.TrainArgs(num_steps=steps)),
        "eval_args": proto_utils.proto_to_json(trainer_pb2.EvalArgs(num_steps=1)),
        "run_fn": "stn_model.trainer.run_fn",
        "custom_config": json_utils.dumps(custom),
    }
    start = time.perf_counter()
    MultiWorkerExecutor().Do(
        {"examples": [examples]}, {"model": [model], "model_run": [model_run]}, properties
    )
    seconds = time.perf_counter() - start
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return {
        "seconds": seconds,
        "cpu_s": sum(u.ru_utime + u.ru_stime for u in usage),
        "peak_rss_mib": max(peak_rss_mib(), usage[1].ru_maxrss / 1024),
    }


def run_in_fresh_process(examples_root, workers, steps, global_batch):
    with tempfile.TemporaryDirectory(prefix="bench-mw-") as workdir:
        command = [sys.executable, __file__, "--one", examples_root, workdir,
                   str(workers), str(steps), str(global_batch)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"run with {workers} worker(s), {steps} steps failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def extra_seconds(workers, short, long, first, second):
    """Seconds the long run took more than the short one; exits when they are too few to
    measure (start-up jitter would swamp them)."""
    extra = second["seconds"] - first["seconds"]
    if extra < MIN_EXTRA_SHARE * first["seconds"]:
        sys.exit(
            f"{workers} worker(s): {long} steps took {second['seconds']:.1f} s, {short} steps "
            f"{first['seconds']:.1f} s: the extra steps took too little time to measure over "
            "start-up noise; give --steps a larger LONG"
        )
    return extra


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[8, 160], metavar=("SHORT", "LONG"))
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        root, workdir, workers, steps, batch = args.one
        print(json.dumps(train_once(root, workdir, int(workers), int(steps), int(batch))))
        return
    short, long = args.steps
    if not 0 < short < long:
        parser.error(f"--steps needs 0 < SHORT < LONG, got {short} {long}")
    rows, baseline = [], None
    with tempfile.TemporaryDirectory(prefix="bench-mw-data-") as data:
        write_examples(Path(data), TRAIN_EXAMPLES)
        for workers in (1, 2):
            first = run_in_fresh_process(data, workers, short, args.global_batch)
            second = run_in_fresh_process(data, workers, long, args.global_batch)
            extra = extra_seconds(workers, short, long, first, second)
            rate = (long - short) * args.global_batch / extra
            baseline = baseline or rate
            rows.append([workers, args.global_batch, first["seconds"], second["seconds"], rate,
                         rate / baseline, second["cpu_s"], second["peak_rss_mib"]])  # fmt: skip
    print(
        f"steps {short} and {long}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print_table(
        ["workers", "global batch", f"{short} steps s", f"{long} steps s", "examples/s", "x",
         "CPU s", "peak RSS MiB"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
