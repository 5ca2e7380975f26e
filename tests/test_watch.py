"""`stn-pipeline watch`: which spans are new, the lock, the state, and one real pipeline run.

The fast tests inject `ServingStandIn.run`, a run function that does what the pipeline does to
the disk (it pushes a new version folder to serving when the run is blessed) and records each
request; the slow test runs the real TFX pipeline through the watcher on tiny spans.
"""

import errno
import json
import os
import re
import threading

import pytest

from pipeline import cli, watcher
from pipeline.watcher import RunOutcome, RunRequest, Watcher, WatcherBusy


def _span(root, number):
    """A complete span folder (the watcher looks at folder names only)."""
    os.makedirs(os.path.join(root, f"span-{number}", "train", "0"))


class ServingStandIn:
    """A run function: records requests; a blessed run pushes version N+1 under serving/."""

    def __init__(self, serving_dir, blessed=True):
        self.serving_dir = serving_dir
        self.blessed = blessed
        self.requests = []

    def run(self, request):
        self.requests.append(request)
        pushed = None
        if self.blessed:
            pushed = os.path.join(self.serving_dir, str(len(os.listdir(self.serving_dir)) + 1))
            os.makedirs(pushed)
        return RunOutcome(spans=request.spans, blessed=self.blessed, pushed_to=pushed)


@pytest.fixture
def setup(tmp_path):
    home, data, serving = tmp_path / "home", tmp_path / "data", tmp_path / "home" / "serving"
    os.makedirs(data)
    os.makedirs(serving)
    stand_in = ServingStandIn(str(serving))

    def make_watcher(window=1, run_fn=None):
        return Watcher(str(home), str(data), str(serving), run_fn or stand_in.run, window)

    return home, data, serving, stand_in, make_watcher


def test_complete_spans_skip_partial_and_foreign_folders(tmp_path):
    for name in ("span-1", "span-10", "span-2", ".span-3.partial", "span-0", "span-x", "other"):
        os.makedirs(tmp_path / name)
    (tmp_path / "span-4").write_text("a file, not a span folder")
    assert watcher.complete_spans(str(tmp_path)) == [1, 2, 10]


def test_complete_spans_of_a_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"data root .*nowhere is not a directory"):
        watcher.complete_spans(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("available", "last_trained", "window", "expected"),
    [
        ([], 0, 1, ()),
        ([1], 0, 1, (1,)),
        ([1], 1, 1, ()),
        ([1, 2, 3], 1, 1, (3,)),
        ([1, 2, 3], 1, 2, (2, 3)),
        ([1, 2, 3], 0, 5, (1, 2, 3)),
        ([1, 2], 3, 1, ()),  # a late older span does not retrain on older data
        ([1, 3, 4], 0, 3, (3, 4)),  # a window is consecutive spans: it stops at a gap
        ([2, 3, 5], 3, 2, (5,)),
    ],
)
def test_next_spans(available, last_trained, window, expected):
    assert watcher.next_spans(available, last_trained, window) == expected


def test_span_1_gives_one_run_and_no_new_data_gives_none(setup):
    home, data, serving, stand_in, make_watcher = setup
    assert make_watcher().watch(once=True) == []  # no data at all: no run
    _span(data, 1)
    (outcome,) = make_watcher().watch(once=True)
    assert stand_in.requests == [RunRequest(spans=(1,), warm_start=None)]
    assert outcome.pushed_to == str(serving / "1")
    assert make_watcher().watch(once=True) == []  # a restarted watcher: nothing new
    assert len(stand_in.requests) == 1
    (run,) = json.loads((home / watcher.STATE_FILE).read_text())["runs"]
    assert run["spans"] == [1] and run["blessed"] is True


def test_span_2_gives_exactly_one_more_run_warm_started_and_a_new_served_version(setup):
    home, data, serving, stand_in, make_watcher = setup
    _span(data, 1)
    make_watcher().watch(once=True)
    _span(data, 2)
    os.makedirs(data / ".span-3.partial")  # being written: not yet a span
    make_watcher().watch(once=True)
    make_watcher().watch(once=True)
    assert stand_in.requests[1:] == [RunRequest(spans=(2,), warm_start=str(serving / "1"))]
    assert sorted(os.listdir(serving)) == ["1", "2"]
    os.rename(data / ".span-3.partial", data / "span-3")
    make_watcher().watch(once=True)  # warm-started from the newest of the served versions
    assert stand_in.requests[2:] == [RunRequest(spans=(3,), warm_start=str(serving / "2"))]
    runs = json.loads((home / watcher.STATE_FILE).read_text())["runs"]
    assert [run["spans"] for run in runs] == [[1], [2], [3]]  # the state keeps every run


def test_an_unblessed_run_is_recorded_and_serving_keeps_the_old_version(setup):
    _, data, serving, stand_in, make_watcher = setup
    _span(data, 1)
    make_watcher().watch(once=True)
    stand_in.blessed = False
    _span(data, 2)
    (outcome,) = make_watcher().watch(once=True)
    assert (outcome.blessed, outcome.pushed_to) == (False, None)
    assert os.listdir(serving) == ["1"]
    lines = []
    watch = make_watcher()
    watch.report = lines.append
    assert watch.watch(once=True) == []  # span 2 was trained on: no retry
    assert lines == [f"no new span under {data} (trained up to span 2)"]
    _span(data, 3)
    make_watcher().watch(once=True)
    assert stand_in.requests[-1] == RunRequest(spans=(3,), warm_start=str(serving / "1"))


def test_window_trains_on_the_last_k_spans(setup):
    _, data, _, stand_in, make_watcher = setup
    for number in (1, 2, 3):
        _span(data, number)
    make_watcher(window=2).watch(once=True)
    assert stand_in.requests[0].spans == (2, 3)


def test_a_crash_mid_run_leaves_state_and_serving_untouched_and_is_retried(setup):
    home, data, serving, stand_in, make_watcher = setup
    _span(data, 1)

    def crash(request):
        raise RuntimeError("Trainer died")

    with pytest.raises(RuntimeError, match="Trainer died"):
        make_watcher(run_fn=crash).watch(once=True)
    assert not (home / watcher.STATE_FILE).exists()
    assert os.listdir(serving) == []
    make_watcher().watch(once=True)
    assert [request.spans for request in stand_in.requests] == [(1,)]


def test_the_polling_loop_reports_a_failed_run_and_retries_it(setup):
    _, data, _, stand_in, make_watcher = setup
    _span(data, 1)
    attempts, lines = [], []

    def flaky(request):
        attempts.append(request)
        if len(attempts) == 1:
            raise OSError("disk full")
        return stand_in.run(request)

    class Stop(Exception):
        pass

    def sleep(seconds):
        assert seconds == 7
        if len(attempts) == 2:
            raise Stop

    watch = make_watcher(run_fn=flaky)
    watch.report = lines.append
    with pytest.raises(Stop):
        watch.watch(interval_s=7, sleep=sleep)
    assert [request.spans for request in attempts] == [(1,), (1,)]
    assert "run failed, will retry: OSError: disk full" in lines


def test_two_watchers_at_once_make_one_run(setup):
    _, data, _, stand_in, make_watcher = setup
    _span(data, 1)
    running, release = threading.Event(), threading.Event()

    def slow_run(request):
        running.set()
        release.wait(timeout=60)
        return stand_in.run(request)

    first = threading.Thread(target=make_watcher(run_fn=slow_run).watch, kwargs={"once": True})
    first.start()
    try:
        assert running.wait(timeout=60)
        with pytest.raises(WatcherBusy, match=rf"pid {os.getpid()}\) holds .*watch\.lock"):
            make_watcher().watch(once=True)
    finally:
        release.set()
        first.join()
    assert len(stand_in.requests) == 1
    assert make_watcher().watch(once=True) == []  # the lock is free again; nothing new


def test_a_lock_held_for_a_moment_is_waited_for_not_reported_busy(tmp_path):
    """`report` probes the lock (lock_held) with a shared flock: a run starting then waits."""
    import fcntl

    path = tmp_path / watcher.LOCK_FILE
    path.write_text("")
    with open(path) as probe:
        fcntl.flock(probe, fcntl.LOCK_SH)
        threading.Timer(0.3, probe.close).start()  # the probe lets go
        with watcher.exclusive_lock(str(path)):
            assert path.read_text() == f"{os.getpid()}\n"


def test_watch_command_exits_with_a_message_while_another_watcher_runs(setup, capsys):
    home, data, _, _, _ = setup
    _span(data, 1)
    os.makedirs(home, exist_ok=True)
    with watcher.exclusive_lock(str(home / watcher.LOCK_FILE)):
        argv = ["watch", "--once", "--home", str(home), "--data-root", str(data)]
        assert cli.main(argv) == 3
    assert "another run or watcher" in capsys.readouterr().err
    assert not (home / watcher.STATE_FILE).exists()


def test_run_command_exits_3_while_a_watcher_holds_the_home(setup, capsys):
    home, data, _, _, _ = setup
    _span(data, 1)
    os.makedirs(home, exist_ok=True)
    with watcher.exclusive_lock(str(home / watcher.LOCK_FILE)):
        assert cli.main(["run", "--home", str(home), "--data-root", str(data)]) == 3
        assert cli.main(["run", "--home", str(home)]) == 3  # would make the default data
    assert f"another run or watcher (pid {os.getpid()}) holds" in capsys.readouterr().err
    assert not (home / "metadata.sqlite").exists() and not (home / "data").exists()


def _stub_pipeline_run(monkeypatch, serving):
    """`run` runs nothing and reads a blessed, pushed run on span 1."""
    from pipeline import local_runner, summary

    result = summary.RunReport(
        spans=[((1,), {"train": 10, "eval": 10})],
        anomalies=[],
        metrics={},
        blessed=True,
        why=[],
        pushed_to=str(serving / "1"),
        push_note="pushed",
        timings={},
    )
    monkeypatch.setattr(local_runner, "local_pipeline", lambda config: None)
    monkeypatch.setattr(local_runner, "component_ids", lambda pipeline: [])
    monkeypatch.setattr(local_runner, "run_local", lambda pipeline: None)
    monkeypatch.setattr(summary, "run_report", lambda config: result)


def test_a_span_the_run_command_trained_on_is_not_new_to_the_watcher(setup, monkeypatch):
    home, data, serving, stand_in, make_watcher = setup
    _span(data, 1)
    _stub_pipeline_run(monkeypatch, serving)
    assert cli.main(["run", "--home", str(home), "--data-root", str(data)]) == 0
    assert make_watcher().watch(once=True) == []  # span 1 is trained on: no run
    assert stand_in.requests == []
    _span(data, 2)
    make_watcher().watch(once=True)
    assert stand_in.requests == [RunRequest(spans=(2,), warm_start=None)]


def test_a_watch_state_that_cannot_be_written_does_not_fail_a_finished_run(
    setup, monkeypatch, capsys
):
    home, data, serving, _, _ = setup
    _span(data, 1)
    _stub_pipeline_run(monkeypatch, serving)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(watcher.tempfile, "NamedTemporaryFile", disk_full)
    assert cli.main(["run", "--home", str(home), "--data-root", str(data)]) == 0
    assert "not recorded for `watch`: [Errno 28] No space left" in capsys.readouterr().err


def test_a_finished_run_the_watcher_cannot_record_stops_it_instead_of_training_again(
    setup, monkeypatch
):
    home, data, serving, stand_in, make_watcher = setup
    _span(data, 1)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def sleep(seconds):
        raise AssertionError("the watcher polled again")

    monkeypatch.setattr(watcher.tempfile, "NamedTemporaryFile", disk_full)
    with pytest.raises(watcher.WatchStateError) as stopped:
        make_watcher().watch(interval_s=1, sleep=sleep)
    (version,) = os.listdir(serving)
    assert str(stopped.value) == (
        f"run on span(s) [1] finished: blessed, pushed to {serving / version}; but the watcher "
        f"stops: {home / watcher.STATE_FILE} cannot be written ([Errno 28] No space left on "
        "device), and until it can, every poll would train on these spans again"
    )
    assert len(stand_in.requests) == 1


@pytest.mark.parametrize(
    ("interval", "words"),
    [
        ("nan", "must be a finite number of seconds > 0, got 'nan'"),
        ("inf", "must be a finite number of seconds > 0, got 'inf'"),
        ("0", "must be a finite number of seconds > 0, got '0'"),
        ("-5", "must be a finite number of seconds > 0, got '-5'"),
        ("soon", "'soon' is not a number of seconds"),
    ],
)
def test_watch_command_rejects_an_interval_that_is_not_a_positive_time(
    tmp_path, capsys, interval, words
):
    argv = ["watch", "--once", "--home", str(tmp_path), "--data-root", str(tmp_path)]
    with pytest.raises(SystemExit) as raised:
        cli.main([*argv, f"--interval={interval}"])
    assert raised.value.code == 2
    assert f"argument --interval: {words}" in capsys.readouterr().err
    assert not (tmp_path / watcher.LOCK_FILE).exists()


@pytest.mark.parametrize(
    ("yaml_text", "flags", "window"),
    [("", [], 1), ("span_window: 3\n", [], 3), ("span_window: 3\n", ["--window", "2"], 2)],
)
def test_the_watch_window_is_the_flag_else_the_config_files_span_window(
    tmp_path, monkeypatch, yaml_text, flags, window
):
    made = []

    class Recorder(Watcher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(watcher, "Watcher", Recorder)
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text or "{}\n")
    argv = ["watch", "--once", "--home", str(tmp_path), "--data-root", str(tmp_path)]
    assert cli.main([*argv, "--config", str(config), *flags]) == 0  # no span: no run
    assert [made_watcher.window for made_watcher in made] == [window]


def test_watch_command_rejects_bad_arguments(tmp_path, capsys):
    argv = ["watch", "--once", "--home", str(tmp_path), "--data-root", str(tmp_path / "missing")]
    assert cli.main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main([*argv[:-1], str(tmp_path), "--window", "0"]) == 2
    assert "--window must be >= 1" in capsys.readouterr().err


def test_served_versions_are_folders_of_ascii_digits_in_numeric_order(tmp_path):
    from pipeline.summary import served_versions

    for name in ("10", "9", "\u00b2", "latest", ".incoming-11"):
        (tmp_path / name).mkdir()
    assert served_versions(str(tmp_path)) == ["9", "10"]


def test_run_config_carries_the_span_window_and_warm_start():
    from pipeline.configs import load_config

    config = load_config(epochs=2)
    window = watcher.run_config(config, RunRequest(spans=(4, 5, 6), warm_start="/s/stn/7"))
    assert (window.span, window.span_window, window.warm_start_model) == (6, 3, "/s/stn/7")
    assert window.trainer_custom_config()["warm_start_model"] == "/s/stn/7"
    assert window.epochs == 2
    first = watcher.run_config(config, RunRequest(spans=(1,), warm_start=None))
    assert (first.span, first.span_window, first.warm_start_model) == (1, 1, None)
    assert "warm_start_model" not in first.trainer_custom_config()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "JSONDecodeError"),
        ('{"runs": {}}', "'runs' is dict, not a list"),
        ('{"runs": [1]}', "run 0 has no 'spans' list of span numbers >= 1: 1"),
        ('{"runs": [{"span": [1]}]}', "run 0 has no 'spans' list"),
        ('{"runs": [{"spans": [1]}, {"spans": ["a"]}]}', "run 1 has no 'spans' list"),
        (None, "IsADirectoryError"),  # a folder in its place: unreadable
    ],
)
def test_a_corrupt_state_file_stops_the_watcher_naming_it(setup, text, problem):
    home, data, _, stand_in, make_watcher = setup
    _span(data, 1)
    os.makedirs(home, exist_ok=True)
    if text is None:
        (home / watcher.STATE_FILE).mkdir()
    else:
        (home / watcher.STATE_FILE).write_text(text)
    message = rf"watch_state\.json is not a watcher's state file: {re.escape(problem)}"
    with pytest.raises(watcher.WatchStateError, match=message):
        make_watcher().watch(once=False, sleep=lambda s: pytest.fail("the watcher went on"))
    assert stand_in.requests == []


def test_watch_command_exits_2_on_a_corrupt_state_file(tmp_path, capsys):
    (tmp_path / watcher.STATE_FILE).write_text('{"runs": [1]}')
    _span(tmp_path / "data", 1)
    argv = ["watch", "--once", "--home", str(tmp_path), "--data-root", str(tmp_path / "data")]
    assert cli.main(argv) == 2
    assert "watch_state.json is not a watcher's state file: run 0" in capsys.readouterr().err


# --- the real pipeline ------------------------------------------------------------------------


@pytest.mark.slow
def test_watch_runs_the_real_pipeline_once_per_new_span(tmp_path, capsys):
    from pipeline import spans
    from pipeline.summary import served_versions

    home, data = tmp_path / "home", tmp_path / "data"
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "train_steps: 2\nbatch_size: 16\naccuracy_floor: 0.0\nregression_tolerance: 1.0\n"
    )
    argv = ["watch", "--once", "--home", str(home), "--data-root", str(data)]
    argv += ["--config", str(config)]
    serving = home / "serving" / "stn"
    state = home / watcher.STATE_FILE

    spans.write_span(data, span=1, per_class=3, copies=1)
    assert cli.main(argv) == 0
    assert [run["spans"] for run in json.loads(state.read_text())["runs"]] == [[1]]
    assert len(served_versions(serving)) == 1

    assert cli.main(argv) == 0  # no new data: no run
    assert len(json.loads(state.read_text())["runs"]) == 1

    first_served = str(serving / served_versions(serving)[0])
    spans.write_span(data, span=2, per_class=3, copies=1)
    capsys.readouterr()
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert f"      warm-started from {first_served}\n" in out  # our INFO lines, indented
    assert "INFO absl" not in out + err  # the libraries' chatter is hidden
    runs = json.loads(state.read_text())["runs"]
    assert [run["spans"] for run in runs] == [[1], [2]]
    assert runs[1]["blessed"] is True  # floor 0 and any regression allowed
    assert len(served_versions(serving)) == 2
    assert runs[1]["pushed_to"] == str(serving / served_versions(serving)[-1])


@pytest.mark.slow
def test_watch_with_a_window_trains_on_the_spans_it_ingested(tmp_path):
    from pipeline import spans, summary
    from pipeline.configs import load_config

    home, data = tmp_path / "home", tmp_path / "data"
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(
        "train_steps: 2\nbatch_size: 16\naccuracy_floor: 0.0\nregression_tolerance: 1.0\n"
        "span_window: 2\n"
    )
    for span in (1, 2, 3):
        spans.write_span(data, span=span, per_class=3, copies=1)
    argv = ["watch", "--once", "--home", str(home), "--data-root", str(data)]
    assert cli.main([*argv, "--config", str(config_file)]) == 0
    runs = json.loads((home / watcher.STATE_FILE).read_text())["runs"]
    assert [run["spans"] for run in runs] == [[2, 3]]
    # The statistics the gate checked count the examples of both spans' manifests.
    manifests = [spans.read_manifest(data / f"span-{span}") for span in (2, 3)]
    config = load_config(str(config_file), home=str(home), data_root=str(data))
    [(ingested, counts)] = summary.run_report(config).spans
    assert ingested == (2, 3)
    assert "data: spans 2, 3 (" in summary.format_report(summary.run_report(config))
    for split in ("train", "eval"):
        assert counts[split] == sum(row["split"] == split for rows in manifests for row in rows)


def test_a_state_write_that_fails_leaves_no_temp_file_and_the_old_state(tmp_path, monkeypatch):
    state = watcher.WatchState(str(tmp_path / watcher.STATE_FILE))
    state.record(RunOutcome(spans=(1,), blessed=True, pushed_to=None))

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(watcher.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        state.record(RunOutcome(spans=(2,), blessed=True, pushed_to=None))
    assert os.listdir(tmp_path) == [watcher.STATE_FILE]
    assert state.last_trained_span() == 1


def test_an_interrupted_watch_once_exits_130_not_0(setup, monkeypatch, capsys):
    from pipeline import local_runner

    home, data, _, _, _ = setup
    _span(data, 1)

    def interrupted(pipeline):
        raise KeyboardInterrupt

    monkeypatch.setattr(local_runner, "run_local", interrupted)
    argv = ["watch", "--once", "--home", str(home), "--data-root", str(data)]
    assert cli.main(argv) == 130
    assert "stn-pipeline watch: interrupted" in capsys.readouterr().err


def test_a_failed_watch_run_prints_its_summary_naming_the_failed_component(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "span-1").mkdir(parents=True)  # a span with no images: ImageExampleGen fails
    argv = ["watch", "--once", "--home", str(tmp_path / "home"), "--data-root", str(data)]
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert "not pushed: the pipeline stopped before the Pusher (ImageExampleGen failed)" in out
    assert "stn-pipeline watch: run failed: " in err and "found no input under" in err
