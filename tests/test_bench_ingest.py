"""benchmarks/bench_ingest.py: what its CPU column counts."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_yardstick_cpu_time_is_its_loop_not_the_tensorflow_import(tmp_path):
    """Three images take milliseconds; importing TensorFlow first takes seconds of CPU."""
    folder = tmp_path / "span-1" / "train" / "0"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((42, 42), i, np.uint8)).save(folder / f"{i}.png")
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_ingest.py", "--child", "plain loop", "--data", tmp_path],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["cpu_s"] < 0.5, result
