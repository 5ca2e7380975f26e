"""Automatic retraining: run the pipeline when a new span of data arrives, and only then.

    watcher = Watcher(home, data_root, serving_dir, run_fn=pipeline_run_fn(config), window=1)
    watcher.watch(interval_s=300)          # or watcher.watch(once=True)

Each poll lists the complete spans (folders ``span-N``; a span being written is still called
``.span-N.partial``). When the newest is newer than every span already trained on, `run_fn`
gets a `RunRequest`: the newest span N, or the window N-K+1..N of `window` K consecutive spans
(shorter while fewer consecutive spans end at N: at the start, or after a gap in the numbers),
and the newest served model (the last one the Evaluator blessed and the Pusher pushed) to
warm-start from. No new span: no run. The pipeline ingests the window's spans together, and
the spans recorded as trained on are those its ImageExampleGen ingested.

Restart-safe: the spans trained on are recorded in ``<home>/watch_state.json`` (by `run` too),
written atomically (temp file + rename) only after a run finished, so a crash mid-run retrains that
span on the next poll and never twice after success; serving changes only through the
pipeline's Pusher, which pushes blessed models only. One run or watcher per home: an exclusive
``fcntl.flock`` on ``<home>/watch.lock``, held while the watcher lives (`run` takes it too).
"""

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import re
import tempfile
import time

from pipeline.summary import served_versions

STATE_FILE = "watch_state.json"
LOCK_FILE = "watch.lock"
EXIT_BUSY = 3  # the exit status of `run` and `watch` while another one holds the home
LOCK_PATIENCE_S = 1.0  # how long to wait out a lock held briefly (`report`'s probe of it)
_SPAN_FOLDER = re.compile(r"span-([1-9][0-9]*)")

logger = logging.getLogger(__name__)


class WatcherBusy(RuntimeError):
    """Another run or watcher holds the lock of this home."""


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """What to train on: span numbers (oldest first) and a SavedModel to warm-start from."""

    spans: tuple
    warm_start: str | None


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """What a finished run did: the spans it trained on, the blessing, where it pushed."""

    spans: tuple
    blessed: bool | None
    pushed_to: str | None

    @classmethod
    def of(cls, result, spans=()):
        """The outcome of a run whose `summary.RunReport` is `result`: the spans its
        ImageExampleGen ingested, as ML Metadata records them (else `spans`)."""
        ingested = result.spans[0][0] if result.spans else spans
        return cls(spans=ingested, blessed=result.blessed, pushed_to=result.pushed_to)


def complete_spans(data_root):
    """The span numbers of the complete ``span-N`` folders under `data_root`, ascending."""
    if not os.path.isdir(data_root):
        raise ValueError(f"data root {data_root} is not a directory")
    spans = []
    for name in os.listdir(data_root):
        match = _SPAN_FOLDER.fullmatch(name)
        if match and os.path.isdir(os.path.join(data_root, name)):
            spans.append(int(match.group(1)))
    return sorted(spans)


def next_spans(available, last_trained, window):
    """The consecutive spans, at most `window`, ending at the newest of `available` (ascending)
    if it is past `last_trained`, else ()."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not available or available[-1] <= last_trained:
        return ()
    newest = available[-1]
    spans = [newest]
    while len(spans) < window and spans[0] - 1 in available:
        spans.insert(0, spans[0] - 1)
    return tuple(spans)


class WatchStateError(ValueError):
    """The state file cannot be read (no run can be planned until it is fixed or removed), or
    written (a finished run would be trained again)."""


def _runs_problem(runs):
    """What is wrong with the `runs` list of a state file, or None."""
    if not isinstance(runs, list):
        return f"'runs' is {type(runs).__name__}, not a list"
    for index, run in enumerate(runs):
        spans = run.get("spans") if isinstance(run, dict) else None
        if not isinstance(spans, list) or not all(
            isinstance(span, int) and not isinstance(span, bool) and span >= 1 for span in spans
        ):
            return f"run {index} has no 'spans' list of span numbers >= 1: {run!r}"
    return None


class WatchState:
    """The runs the watcher finished, in ``<home>/watch_state.json``."""

    def __init__(self, path):
        self.path = path

    def runs(self):
        if not os.path.exists(self.path):
            return []
        try:
            with open(self.path) as handle:
                runs = json.load(handle)["runs"]
            problem = _runs_problem(runs)
        except (OSError, ValueError, KeyError, TypeError) as error:  # unreadable, or not ours
            problem = f"{type(error).__name__}: {error}"
        if problem:
            raise WatchStateError(
                f"watch state {self.path} is not a watcher's state file: {problem}"
            )
        return runs

    def last_trained_span(self):
        return max((span for run in self.runs() for span in run["spans"]), default=0)

    def record(self, outcome):
        """Append `outcome` as a finished run; the file is replaced atomically."""
        run = {
            "spans": list(outcome.spans),
            "blessed": outcome.blessed,
            "pushed_to": outcome.pushed_to,
            "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        runs = [*self.runs(), run]
        folder = os.path.dirname(self.path)
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed before the rename)
            "w", dir=folder, prefix=".watch_state.", suffix=".tmp", delete=False
        )
        try:
            with handle:
                json.dump({"runs": runs}, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, self.path)
        except BaseException:  # a full disk: leave no partial temp file behind
            os.remove(handle.name)
            raise


@contextlib.contextmanager
def exclusive_lock(path):
    """Hold an exclusive flock on `path` or raise WatcherBusy naming the holder (one that
    still holds it after LOCK_PATIENCE_S)."""
    handle = open(path, "a+")  # noqa: SIM115 (held for the lifetime of the context)
    try:
        if not _flock_within(handle, LOCK_PATIENCE_S):
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise WatcherBusy(
                f"another run or watcher (pid {holder}) holds {path}; one per home at a time"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def _flock_within(handle, seconds):
    """Take an exclusive flock on `handle`, trying for `seconds`; whether it was taken."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def lock_held(path):
    """Whether a live run or watcher holds the exclusive lock on `path` (a killed one does not:
    the kernel releases a dead process's flock)."""
    try:
        handle = open(path)  # noqa: SIM115 (closed below, which drops the probe's lock)
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


class Watcher:
    """Polls `data_root` for new spans and calls `run_fn(RunRequest) -> RunOutcome` on them."""

    def __init__(self, home, data_root, serving_dir, run_fn, window=1, report=logger.info):
        if window < 1:
            raise ValueError(f"--window must be >= 1, got {window}")
        os.makedirs(home, exist_ok=True)
        self.data_root = data_root
        self.serving_dir = serving_dir
        self.run_fn = run_fn
        self.window = window
        self.report = report
        self.state = WatchState(os.path.join(home, STATE_FILE))
        self.lock_path = os.path.join(home, LOCK_FILE)

    def pending_request(self):
        """The `RunRequest` a poll now would make, or None when there is no new span."""
        spans = next_spans(
            complete_spans(self.data_root), self.state.last_trained_span(), self.window
        )
        if not spans:
            return None
        versions = served_versions(self.serving_dir)
        warm_start = os.path.join(self.serving_dir, versions[-1]) if versions else None
        return RunRequest(spans=spans, warm_start=warm_start)

    def poll(self):
        """One look at the data: run on new spans and record the run; the outcome or None."""
        request = self.pending_request()
        if request is None:
            last = self.state.last_trained_span()  # spans start at 1: 0 is none
            trained = f"trained up to span {last}" if last else "no span trained yet"
            self.report(f"no new span under {self.data_root} ({trained})")
            return None
        start = "from scratch" if request.warm_start is None else f"from {request.warm_start}"
        self.report(f"new data: training on span(s) {list(request.spans)}, {start}")
        outcome = self.run_fn(request)
        verdict = "blessed" if outcome.blessed else "not blessed"
        pushed = f"pushed to {outcome.pushed_to}" if outcome.pushed_to else "not pushed"
        finished = f"run on span(s) {list(outcome.spans)} finished: {verdict}, {pushed}"
        try:
            self.state.record(outcome)
        except OSError as error:  # unrecorded, its spans would be trained and pushed again
            raise WatchStateError(
                f"{finished}; but the watcher stops: {self.state.path} cannot be written "
                f"({error}), and until it can, every poll would train on these spans again"
            ) from error
        self.report(finished)
        return outcome

    def watch(self, interval_s=300.0, once=False, sleep=time.sleep):
        """Poll under the lock, every `interval_s` seconds (once: a single poll); runs made.

        A failing run is reported and retried at the next poll (with `once`, it raises); a
        state file that cannot be read or written (WatchStateError) stops the watcher.
        """
        outcomes = []
        with exclusive_lock(self.lock_path):
            while True:
                try:
                    outcome = self.poll()
                except WatchStateError:
                    raise
                except Exception as error:
                    if once:
                        raise
                    self.report(f"run failed, will retry: {type(error).__name__}: {error}")
                    outcome = None
                if outcome is not None:
                    outcomes.append(outcome)
                if once:
                    return outcomes
                sleep(interval_s)


# --- the real run: the TFX pipeline on this machine ------------------------------------------


def run_config(config, request):
    """`config` for one watcher run: the request's newest span, span window and warm start.

    The request's window replaces the config's `span_window`: the watcher's window (`--window`,
    which defaults to the config's `span_window`) shortened to the consecutive spans that exist.
    """
    return config.replace(
        span=request.spans[-1],
        span_window=len(request.spans),
        warm_start_model=request.warm_start,
    )


def pipeline_run_fn(config, report=logger.info):
    """A `run_fn` that runs the pipeline of `config` with LocalDagRunner; reports its summary."""

    def run(request):
        from pipeline import local_runner, summary

        this_run = run_config(config, request)
        try:
            local_runner.run_local(local_runner.local_pipeline(this_run))
        except Exception:  # the summary names the failed component; the error is re-raised
            with contextlib.suppress(Exception):
                report(summary.format_report(summary.run_report(this_run)))
            raise
        result = summary.run_report(this_run)
        report(summary.format_report(result))
        return RunOutcome.of(result, request.spans)

    return run
