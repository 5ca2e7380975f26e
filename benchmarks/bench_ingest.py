"""Ingestion + statistics throughput: ImageExampleGen and StatisticsGen on a 20,000-image span.

The span comes from `pipeline.spans.write_span` (distorted MNIST, RTS, 42x42; 4 copies of the
5,000 digits), cached under --data. Each mode runs in a fresh process: the pipeline
ImageExampleGen -> StatisticsGen -> ImportSchemaGen -> ExampleValidator -> gate under
LocalDagRunner, with Beam's DirectRunner in-memory (the baseline) or multi-processing with 2
workers. Component wall times come from ML Metadata (execution start to end); "pipeline s" is
the whole run. A third row, the yardstick, is a plain Python loop doing each image's read +
decode check without Beam. "x" columns: the baseline's time over this row's time.
CPU s counts the mode's process and its Beam workers over what "pipeline s" times (the
yardstick: its loop), not the imports before it; on a shared machine wall time swings with the
load of other processes (the 1-minute load average is printed), CPU time much less.
Peak RSS is that of the largest process of the mode (the pipeline process or a Beam worker).

    .venv/bin/python benchmarks/bench_ingest.py [--copies 4] [--data DIR]
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

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

MODES = {
    "in_memory": ["--direct_running_mode=in_memory"],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}
YARDSTICK = "plain loop"
DIGITS = 5000  # source digits per span (pipeline.spans: 4,500 train + 500 eval)


def ensure_span(data_root, copies):
    """Span 1 of `copies` x 5,000 RTS images under data_root (written once, then reused)."""
    from pipeline.spans import span_dir, write_span

    folder = span_dir(data_root, 1)
    stamp = folder / f".bench-copies-{copies}"
    if not stamp.exists():
        start = time.perf_counter()
        write_span(data_root, span=1, variant="rts", copies=copies, force=True, report=print)
        stamp.touch()
        print(f"wrote {copies * DIGITS} images in {time.perf_counter() - start:.0f} s")
    return folder


def run_mode(mode, data_root, home):
    """Runs the pipeline in this process; -> dict of seconds per component and peak RSS."""
    from ml_metadata.metadata_store import metadata_store
    from tfx.orchestration import metadata
    from tfx.orchestration import pipeline as tfx_pipeline
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from components.image_example_gen import ImageExampleGen
    from pipeline.validation import build_validation

    example_gen = ImageExampleGen(input_base=str(data_root))
    nodes = build_validation(example_gen.outputs["examples"])
    config = metadata.sqlite_metadata_connection_config(os.path.join(home, "metadata.sqlite"))
    start, cpu = time.perf_counter(), cpu_seconds()
    LocalDagRunner().run(
        tfx_pipeline.Pipeline(
            pipeline_name=f"bench-{mode}",
            pipeline_root=os.path.join(home, "pipeline_root"),
            components=[example_gen, *nodes.components()],
            metadata_connection_config=config,
            beam_pipeline_args=MODES[mode],
        )
    )
    total, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    store = metadata_store.MetadataStore(config)
    seconds = {}
    for node in ("ImageExampleGen", "StatisticsGen"):
        [context] = [c for c in store.get_contexts_by_type("node") if c.name.endswith(node)]
        [execution] = store.get_executions_by_context(context.id)
        ms = execution.last_update_time_since_epoch - execution.create_time_since_epoch
        seconds[node] = ms / 1000
    return {
        "ingest_s": seconds["ImageExampleGen"],
        "stats_s": seconds["StatisticsGen"],
        "pipeline_s": total,
        "cpu_s": cpu,
    }


def run_yardstick(data_root):
    """Reads and checks every image in one Python loop (the executor's per-image work)."""
    from components.image_decoding import image_problem

    paths = sorted(Path(data_root).glob("span-1/*/*/*.png"))
    start, cpu = time.perf_counter(), cpu_seconds()
    bad = sum(image_problem(path.read_bytes(), (42, 42, 1)) is not None for path in paths)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if bad:
        raise RuntimeError(f"{bad} images of the benchmark span failed the check")
    return {"ingest_s": seconds, "cpu_s": cpu}


def cpu_seconds():
    """CPU time of this process and of its finished child processes (Beam workers), in s."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child(mode, data_root):
    """Runs one mode and prints its result as one JSON line (with CPU time and peak RSS)."""
    with tempfile.TemporaryDirectory(prefix=f"bench_ingest_{mode}_") as home:
        result = run_yardstick(data_root) if mode == YARDSTICK else run_mode(mode, data_root, home)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["peak_rss_mib"] = max(peak_rss_mib(), children)
    result["load"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(result), flush=True)


def measure(mode, data_root):
    process = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--data", str(data_root)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        raise RuntimeError(f"mode {mode} failed:\n{process.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="copies of the 5,000 digits")
    parser.add_argument(
        "--data",
        default=os.path.join(tempfile.gettempdir(), "stn_bench_ingest"),
        help="data root for the benchmark span (kept between runs)",
    )
    parser.add_argument("--child", choices=[*MODES, YARDSTICK], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data)
        return
    if args.copies < 1:
        parser.error(f"--copies must be >= 1, got {args.copies}")
    ensure_span(args.data, args.copies)
    images = args.copies * DIGITS
    results = {mode: measure(mode, args.data) for mode in [*MODES, YARDSTICK]}
    baseline = results["in_memory"]
    rows = []
    for mode, result in results.items():
        rows.append(
            [
                mode,
                result["ingest_s"],
                images / result["ingest_s"],
                baseline["ingest_s"] / result["ingest_s"],
                result.get("stats_s", "-"),
                images / result["stats_s"] if "stats_s" in result else "-",
                result.get("pipeline_s", "-"),
                baseline["pipeline_s"] / result["pipeline_s"] if "pipeline_s" in result else "-",
                result["cpu_s"],
                images / result["cpu_s"],
                result["peak_rss_mib"],
                result["load"],
            ]
        )
    print(f"\n{images} images of 42x42; in_memory is the baseline (x = its time / this time)")
    print_table(
        [
            "mode",
            "ingest s",
            "ingest img/s",
            "ingest x",
            "stats s",
            "stats img/s",
            "pipeline s",
            "pipeline x",
            "CPU s",
            "img/CPU-s",
            "peak RSS MiB",
            "load avg",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
