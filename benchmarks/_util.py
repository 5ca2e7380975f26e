"""Helpers shared by the benchmarks: timing, peak memory and table printing.

    from _util import Timing, time_calls, peak_rss_mib, print_table

`time_calls({"ours": f, "baseline": g})` times the functions in turn, round after round, and
returns a `Timing` per name: the median wall-clock and the median CPU time (all threads of the
process) per call, in milliseconds. On a shared machine the wall-clock time swings with the load
of other processes, while the CPU time counts only the work this process did: report both, and
compare functions timed in the same `time_calls`.
"""

import resource
import statistics
import time
from typing import NamedTuple


class Timing(NamedTuple):
    wall_ms: float
    cpu_ms: float

    def ratio(self, baseline):
        """This timing over a baseline timing (Timing), for wall and CPU time."""
        return Timing(self.wall_ms / baseline.wall_ms, self.cpu_ms / baseline.cpu_ms)


def time_calls(calls, repeats=20, warmup=3):
    """Times each of `calls` (a dict name -> zero-argument function); -> dict name -> Timing.

    Each function runs `warmup` times, then all are called in turn, round after round, for
    `repeats` rounds, so that a change in the machine's load hits all of them alike. A Timing
    holds the median wall-clock and CPU milliseconds per call.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples = {name: ([], []) for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name][1].append(time.process_time() - cpu)
            samples[name][0].append(time.perf_counter() - wall)
    return {
        name: Timing(statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3)
        for name, (walls, cpus) in samples.items()
    }


def peak_rss_mib():
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(headers, rows, file=None):
    """Prints rows (sequences of cells; floats get 2 decimals) under headers, columns aligned,
    to `file` (None: the sys.stdout of the moment)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [headers, ["-" * w for w in widths], *cells]
    for line in lines:
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths, strict=True)), file=file)
