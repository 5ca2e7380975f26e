"""The default `stn-pipeline run`, timed: wall time per component, peak RSS, eval accuracy.

Runs ``python -m pipeline.cli run --home HOME`` in a fresh process (a new, empty home unless
--home is given, so it makes the default data set and nothing is cached), shows its progress,
then reads each component's execution time from ML Metadata (start to end of the execution)
and prints them as a table with each one's share of the whole run. "other" is what no
component accounts for: start-up, making the data set, orchestration and the summary. Peak RSS
is that of the largest process of the run (the pipeline process or one it started).

Targets (the project's issue): the whole default run within 15 minutes on 2 cores; eval
accuracy on the default RTS data >= 97%.

    .venv/bin/python benchmarks/bench_pipeline.py [--home DIR] [-- extra `run` arguments]
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

from _util import print_table

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from pipeline import summary
from pipeline.configs import load_config

TARGET_SECONDS = 15 * 60
TARGET_ACCURACY = 0.97


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="pipeline home (default: a new temporary folder)")
    parser.add_argument("run_args", nargs="*", help="extra arguments for `stn-pipeline run`")
    args = parser.parse_args()
    home = args.home or tempfile.mkdtemp(prefix="bench-pipeline-")
    command = [sys.executable, "-m", "pipeline.cli", "run", "--home", home, *args.run_args]
    print(f"$ {' '.join(command)}  (load average {os.getloadavg()[0]:.1f})", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, check=False)
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if done.returncode != 0:
        print(f"bench: the run failed (exit {done.returncode})", file=sys.stderr)
        return done.returncode

    config = load_config(home=home)
    nodes = summary.latest_node_runs(config.metadata_path, config.pipeline_name)
    rows = [
        (node.node_id, node.state, node.seconds, 100.0 * node.seconds / wall)
        for node in nodes.values()
    ]
    accounted = sum(node.seconds for node in nodes.values())
    rows.append(
        ("other (start-up, data set, summary)", "", wall - accounted, 100 * (1 - accounted / wall))
    )
    rows.append(("total", "", wall, 100.0))
    print()
    print_table(("component", "state", "seconds", "% of run"), rows)

    accuracy = summary.run_report(config).metrics.get("Overall", {}).get("candidate")
    training = nodes["Trainer"].seconds if "Trainer" in nodes else 0.0
    print()
    print_table(
        ("measure", "value", "target", "met"),
        [
            ("whole run, s", wall, f"<= {TARGET_SECONDS}", wall <= TARGET_SECONDS),
            ("training share of the run, %", 100 * training / wall, "", ""),
            (
                "eval accuracy (TFMA, overall)",
                f"{accuracy:.4f}" if accuracy is not None else "none",
                f">= {TARGET_ACCURACY}",
                accuracy is not None and accuracy >= TARGET_ACCURACY,
            ),
            ("peak RSS, MiB", peak_mib, "", ""),
            ("load average (1 min) at the end", os.getloadavg()[0], "", ""),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
