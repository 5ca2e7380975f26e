"""benchmarks/bench_multiworker.py: when the extra steps are too few to measure."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import bench_multiworker  # lives in benchmarks/, put on the path just above


def test_extra_steps_lost_in_start_up_noise_are_refused():
    """Measured here: 8 and 32 steps on 1 worker took 10.26 and 10.67 s in one run, 9.68 and
    11.08 s in the next (1,100 or 3,800 examples/s for the same work)."""
    with pytest.raises(SystemExit, match="larger LONG"):
        bench_multiworker.extra_seconds(1, 8, 32, {"seconds": 10.26}, {"seconds": 10.67})
    extra = bench_multiworker.extra_seconds(1, 8, 160, {"seconds": 10.06}, {"seconds": 14.88})
    assert extra == pytest.approx(4.82)
