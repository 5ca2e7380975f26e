"""pipeline.report: the page from hand-built facts (fast), and from a tiny real run (slow).

Every page is checked the same way: parsed with html.parser, every src/href must be a relative
path that resolves inside the report folder, and every image a PNG that Pillow decodes.
"""

import contextlib
import dataclasses
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from pipeline import cli, report, spans, summary
from pipeline.configs import load_config


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []  # (tag, attribute, value)

    def handle_starttag(self, tag, attrs):
        self.links += [(tag, name, value) for name, value in attrs if name in ("src", "href")]


def page_links(index_html):
    parser = _Links()
    with open(index_html, encoding="utf-8") as handle:
        parser.feed(handle.read())
    return parser.links


def check_self_contained(index_html):
    """Assert every link stays inside the page's folder and every image is a valid PNG."""
    folder = os.path.realpath(os.path.dirname(index_html))
    links = page_links(index_html)
    for tag, _, value in links:
        parts = urlsplit(value)
        assert not parts.scheme and not parts.netloc, value
        assert not os.path.isabs(value), value
        target = os.path.realpath(os.path.join(folder, value))
        assert os.path.commonpath([folder, target]) == folder, value
        assert os.path.isfile(target), value
        if tag == "img":
            with Image.open(target) as image:
                assert image.format == "PNG"
                image.load()  # decodes the whole file
    return [value for tag, _, value in links if tag == "img"]


def identity_grids(count, height, width):
    """[count, height, width, 2] normalized (x, y) pixel centres (align_corners=False)."""
    ys = (2 * np.arange(height) + 1) / height - 1
    xs = (2 * np.arange(width) + 1) / width - 1
    grid = np.stack(np.meshgrid(xs, ys), axis=-1)
    return np.repeat(grid[None], count, axis=0)


def hand_built_facts():
    rng = np.random.default_rng(0)
    results = summary.RunReport(
        spans=[((2, 3), {"train": 1200, "eval": 300})],
        anomalies=["eval: feature 'label' has value 11 outside the domain <0..9>"],
        metrics={
            "Overall": {"candidate": 0.85, "baseline": 0.9, "examples": 300},
            "label:3": {"candidate": 0.8, "baseline": 0.75, "examples": 30},
            "variant:rts": {"candidate": 0.85, "examples": 300},
        },
        blessed=False,
        why=["failed: eval accuracy >= 0.5 and at most 0.01 below the baseline"],
        pushed_to=None,
        push_note="not pushed: the Evaluator did not bless the model; serving keeps version 7",
        timings={},
        skipped=["/data/span-3/train/4/x.png is not a PNG or JPEG file (starts with b'<html>')"],
    )
    samples = [
        report.VariantSamples(
            variant=variant,
            labels=[1, 2, 3],
            inputs=rng.random((3, 42, 42)),
            rectified=rng.random((3, 28, 28)),
            grids=identity_grids(3, 28, 28) * 0.6 if with_grid else None,
        )
        for variant, with_grid in (("rts", True), ("<odd & name>", False))
    ]
    return report.ReportFacts(
        run_id="2026-11-25T14:00:00.5",
        pipeline_name="stn-pipeline",
        results=results,
        samples=samples,
        samples_note="eval images of span 3",
        grid_note="grids <rebuilt>",
        history={"loss": [2.3, 1.1, 0.7], "val_loss": [2.0, 1.3, 0.9], "accuracy": [0.2, 0.6, 0.8]},
        history_note="TensorBoard logs",
    )


def test_page_from_hand_built_facts_is_self_contained(tmp_path):
    index = report.write_report(hand_built_facts(), str(tmp_path / "r"))
    assert index == str(tmp_path / "r" / "index.html")
    images = check_self_contained(index)
    # Rectification per variant, one grid (only "rts" has grids), curves, slice metrics.
    assert sorted(images) == [
        "grid-0-rts.png",
        "rectified-0-rts.png",
        "rectified-1-odd-name.png",
        "slice-metrics.png",
        "training-curves.png",
    ]
    assert sorted(os.listdir(tmp_path / "r")) == sorted([*images, "index.html"])


def test_page_states_the_facts(tmp_path):
    index = report.write_report(hand_built_facts(), str(tmp_path / "r"))
    page = Path(index).read_text(encoding="utf-8")
    assert "spans 2, 3: train 1,200, eval 300 examples" in page
    assert "Skipped 1 bad input(s)" in page
    assert "<li>/data/span-3/train/4/x.png is not a PNG or JPEG file (starts with b&#x27;" in page
    assert "1 found" in page and "value 11 outside the domain &lt;0..9&gt;" in page
    assert "NOT BLESSED" in page
    # Candidate and baseline per slice, and the change: 0.85 - 0.90 and 0.80 - 0.75.
    assert "<td>Overall</td><td>300</td><td>0.8500</td><td>0.9000</td><td>-0.0500</td>" in page
    assert "<td>label:3</td><td>30</td><td>0.8000</td><td>0.7500</td><td>+0.0500</td>" in page
    assert "<td>variant:rts</td><td>300</td><td>0.8500</td><td>&ndash;</td>" in page
    assert "overall accuracy 0.8500 against the baseline's 0.9000" in page
    assert "serving keeps version 7" in page
    # Text from the facts is escaped, never markup.
    assert "variant &lt;odd &amp; name&gt;" in page and "<odd" not in page
    assert "grids &lt;rebuilt&gt;" in page


def test_page_of_a_run_without_results_says_so(tmp_path):
    facts = hand_built_facts()
    facts.results = summary.RunReport(
        spans=[],
        anomalies=None,
        metrics={},
        blessed=None,
        why=["the Evaluator did not run"],
        pushed_to=None,
        push_note="not pushed: the pipeline stopped before the Pusher; nothing is served yet",
        timings={},
    )
    facts.samples, facts.history = [], {}
    index = report.write_report(facts, str(tmp_path / "r"))
    assert check_self_contained(index) == []
    page = Path(index).read_text(encoding="utf-8")
    for words in ("no ingested data", "not checked (the data was not validated)", "not evaluated"):
        assert words in page
    assert "the Evaluator did not run: no metrics" in page
    assert "no baseline" not in page  # the run never compared with one
    assert "stopped before the Pusher" in page
    assert os.listdir(tmp_path / "r") == ["index.html"]


def test_pushed_version_is_shown(tmp_path):
    facts = hand_built_facts()
    facts.results.pushed_to = "/srv/home/serving/stn/1795618300"
    facts.results.blessed = True
    page = Path(report.write_report(facts, str(tmp_path))).read_text(encoding="utf-8")
    assert "pushed to <code>/srv/home/serving/stn/1795618300</code>" in page
    assert ">BLESSED<" in page


def test_samples_cover_every_class_before_repeating_one():
    examples = [("rts", label, f"{label}-{i}".encode()) for label in (0, 1, 2) for i in range(4)]
    examples += [("r", 5, b"r5")]
    picked = report.pick_samples(examples, count=5)
    assert list(picked) == ["r", "rts"]
    assert picked["r"] == [(5, b"r5")]
    assert picked["rts"] == [(0, b"0-0"), (1, b"1-0"), (2, b"2-0"), (0, b"0-1"), (1, b"1-1")]


def test_training_curves_come_from_the_epoch_scalars_of_the_event_files(tmp_path):
    import tensorflow as tf
    from ml_metadata.proto import metadata_store_pb2

    written = {"train": {"loss": [2.0, 1.5, 1.0]}, "validation": {"loss": [2.5, 2.0, 1.75]}}
    for folder, metrics in written.items():
        with tf.summary.create_file_writer(str(tmp_path / folder)).as_default():
            for epoch in (2, 0, 1):  # out of order: the report sorts by step
                tf.summary.scalar("epoch_loss", metrics["loss"][epoch], step=epoch)
                tf.summary.scalar("evaluation_loss_vs_iterations", 9.0, step=epoch)
    model_run = metadata_store_pb2.Artifact(uri=str(tmp_path))
    nodes = {"Trainer": summary.NodeRun("Trainer", "COMPLETE", 1.0, {"model_run": [model_run]})}
    history, note = report._history(nodes)
    assert history == {"loss": [2.0, 1.5, 1.0], "val_loss": [2.5, 2.0, 1.75]}
    assert str(tmp_path) in note


def test_input_pictures_are_decoded_as_the_model_decodes_them():
    import tensorflow as tf

    pixels = np.array([[0, 32768, 65535]], np.uint16)[..., None]  # a 16-bit grey PNG
    decoded = report._decode(tf.io.encode_png(pixels).numpy())
    np.testing.assert_allclose(decoded, [[0.0, 32768 / 65535, 1.0]], atol=1e-6)


@pytest.mark.parametrize(
    ("states", "locked", "words"),
    [
        ({"Trainer": "RUNNING"}, True, "the run is still going (report it again when it ends)"),
        (  # a run killed mid-Trainer leaves it RUNNING, and its lock free
            {"Trainer": "RUNNING"},
            False,
            "the run was stopped (killed or interrupted) before the Pusher",
        ),
        (
            {"ImageExampleGen": "CACHED", "Trainer": "COMPLETE", "Evaluator": "FAILED"},
            False,
            "the pipeline stopped before the Pusher (Evaluator failed)",
        ),
        (
            {"ImageExampleGen": "FAILED"},
            False,
            "the pipeline stopped before the Pusher (ImageExampleGen failed)",
        ),
    ],
)
def test_a_run_that_has_not_reached_the_pusher_says_whether_it_is_still_going(
    tmp_path, states, locked, words
):
    from pipeline import watcher

    nodes = {name: summary.NodeRun(name, state, 1.0, {}) for name, state in states.items()}
    config = load_config(None, {}, home=str(tmp_path))
    for version in ("1000", "99"):
        os.makedirs(os.path.join(config.serving_dir, version))
    lock = os.path.join(tmp_path, watcher.LOCK_FILE)
    with watcher.exclusive_lock(lock):  # an earlier run's lock file stays, no longer held
        pass
    with watcher.exclusive_lock(lock) if locked else contextlib.nullcontext():
        note = summary._push_note(nodes, config)
    assert note == f"not pushed: {words}; serving keeps version 1000"


@pytest.mark.parametrize(
    ("run_id", "folder"),
    [("2026-11-25T14:48:35.123456", "2026-11-25T14-48-35.123456"), ("../x/y", "x-y")],
)
def test_folder_name_is_one_safe_path_component(run_id, folder):
    assert report.folder_name(run_id) == folder


def test_home_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["report", "--home", str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err
    assert "has no pipeline run yet" in error and "stn-pipeline run --home" in error


def _metadata_with_runs(path, runs, properties=None):
    """An ML Metadata store at `path` with `runs` ({run id: (pipeline name, state)}, in
    creation order), laid out as TFX does; each run holds one ``Trainer`` execution, with
    integer custom `properties` ({run id: {name: value}}) where given."""
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2 as pb

    config = pb.ConnectionConfig()
    config.sqlite.filename_uri = str(path)
    config.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    store = metadata_store.MetadataStore(config)
    type_ids = {
        name: store.put_context_type(pb.ContextType(name=name))
        for name in ("pipeline", "pipeline_run", "node")
    }
    execution_type = store.put_execution_type(pb.ExecutionType(name="Trainer"))
    contexts = {}

    def context(type_name, name):
        if name not in contexts:
            [contexts[name]] = store.put_contexts(
                [pb.Context(type_id=type_ids[type_name], name=name)]
            )
        return contexts[name]

    for run_id, (pipeline_name, state) in runs.items():
        run = context("pipeline_run", run_id)
        store.put_parent_contexts(
            [pb.ParentContext(child_id=run, parent_id=context("pipeline", pipeline_name))]
        )
        execution = pb.Execution(type_id=execution_type, last_known_state=state)
        for name, value in (properties or {}).get(run_id, {}).items():
            execution.custom_properties[name].int_value = value
        [execution] = store.put_executions([execution])
        node = context("node", f"{pipeline_name}.Trainer")
        store.put_attributions_and_associations(
            [], [pb.Association(context_id=c, execution_id=execution) for c in (run, node)]
        )


def test_run_ids_and_reading_an_earlier_run(tmp_path):
    from ml_metadata.proto import metadata_store_pb2 as pb

    path = str(tmp_path / "metadata.sqlite")
    runs = {
        "run-1": ("p", pb.Execution.COMPLETE),
        "other": ("q", pb.Execution.FAILED),
        "run-2": ("p", pb.Execution.CACHED),
    }
    _metadata_with_runs(path, runs)
    assert summary.run_ids(path, "p") == ["run-1", "run-2"]
    assert summary.run_ids(path, "q") == ["other"]
    assert summary.latest_node_runs(path, "p")["Trainer"].state == "CACHED"
    assert summary.latest_node_runs(path, "p", run_id="run-1")["Trainer"].state == "COMPLETE"
    with pytest.raises(ValueError, match="run 'nope': no such run of p; runs: run-1, run-2"):
        summary.latest_node_runs(path, "p", run_id="nope")


def test_a_run_is_judged_by_the_num_classes_its_gate_ran_with(tmp_path):
    from ml_metadata.proto import metadata_store_pb2 as pb

    path = str(tmp_path / "metadata.sqlite")
    runs = {"three": ("p", pb.Execution.COMPLETE), "plain": ("p", pb.Execution.COMPLETE)}
    _metadata_with_runs(path, runs, properties={"three": {"num_classes": 3}})
    assert summary.latest_node_runs(path, "p", "three")["Trainer"].properties == {"num_classes": 3}
    assert summary.latest_node_runs(path, "p", "plain")["Trainer"].properties == {}
    config = load_config(None, {}, home=str(tmp_path))  # num_classes 10
    gate = summary.NodeRun("AnomalyGate", "COMPLETE", 1.0, {}, {"num_classes": 3})
    assert summary._num_classes({"AnomalyGate": gate}, config) == 3
    assert summary._num_classes({}, config) == 10


def test_an_earlier_run_is_not_told_by_what_is_served_or_locked_now(tmp_path):
    from ml_metadata.proto import metadata_store_pb2 as pb

    from pipeline import watcher

    config = load_config(None, {}, home=str(tmp_path))
    runs = {
        "killed": ("stn-pipeline", pb.Execution.RUNNING),
        "later": ("stn-pipeline", pb.Execution.COMPLETE),
    }
    _metadata_with_runs(config.metadata_path, runs)
    for version in ("1795962442", "999"):  # the newest, pushed after "killed", and an older one
        os.makedirs(os.path.join(config.serving_dir, version))
    with watcher.exclusive_lock(os.path.join(tmp_path, watcher.LOCK_FILE)):  # a later run
        note = summary.run_report(config, "killed").push_note
    assert note == (
        "not pushed: the run was stopped (killed or interrupted) before the Pusher; "
        "version 1795962442 is served now"
    )


def test_the_latest_run_asked_for_by_its_id_is_told_by_what_is_locked_now(tmp_path):
    from ml_metadata.proto import metadata_store_pb2 as pb

    from pipeline import watcher

    config = load_config(None, {}, home=str(tmp_path))
    runs = {
        "killed": ("stn-pipeline", pb.Execution.RUNNING),
        "going": ("stn-pipeline", pb.Execution.RUNNING),
    }
    _metadata_with_runs(config.metadata_path, runs)
    with watcher.exclusive_lock(os.path.join(tmp_path, watcher.LOCK_FILE)):  # "going" runs
        note = summary.run_report(config, "going").push_note
    assert note == (
        "not pushed: the run is still going (report it again when it ends); nothing is served yet"
    )


# --- a tiny real run -----------------------------------------------------------------------

RUN_CONFIG = """
model: st_cnn_affine
batch_size: 16
train_steps: 4
accuracy_floor: 0.0
"""


def stn(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data, home = root / "data", root / "home"
    spans.write_span(data, span=1, per_class=3, copies=1, report=lambda line: None)
    (root / "config.yaml").write_text(RUN_CONFIG)
    common = ["--home", str(home), "--config", str(root / "config.yaml")]
    done = stn("run", *common, "--data-root", str(data))
    assert done.returncode == 0, done.stdout + done.stderr
    made = stn("report", *common)
    assert made.returncode == 0, made.stdout + made.stderr
    config = load_config(str(root / "config.yaml"), home=str(home), data_root=str(data))
    return {"config": config, "stdout": made.stdout}


@pytest.mark.slow
def test_report_of_a_real_run_is_self_contained(tiny_run):
    config = tiny_run["config"]
    (run_id,) = report.run_ids(config)
    index = tiny_run["stdout"].strip().splitlines()[-1]
    assert index == os.path.join(
        config.home_dir, "reports", report.folder_name(run_id), "index.html"
    )
    images = check_self_contained(index)
    # The default span is all RTS: one variant, its grids, the curves, the slice chart.
    assert sorted(images) == [
        "grid-0-rts.png",
        "rectified-0-rts.png",
        "slice-metrics.png",
        "training-curves.png",
    ]
    page = Path(index).read_text(encoding="utf-8")
    assert "BLESSED" in page and "pushed to <code>" + config.serving_dir in page
    assert "the `grid` output of the same signature" in page


@pytest.mark.slow
def test_real_run_facts_agree_with_the_artifacts(tiny_run):
    from scipy import ndimage

    from stn_model.visualize import normalized_to_pixels

    facts = report.collect_facts(tiny_run["config"])
    (sample,) = facts.samples
    assert sample.variant == "rts" and len(sample.labels) == report.SAMPLES_PER_VARIANT
    # Eight eval images of eight different classes, one per class before any repeats.
    assert len(set(sample.labels)) == report.SAMPLES_PER_VARIANT
    # The drawn grids are the ones the model sampled with: bilinear sampling of the inputs at
    # the grids' pixel coordinates (SciPy, zeros outside) gives the `rectify` images.
    height, width = sample.inputs.shape[1:]
    for image, grid, rectified in zip(sample.inputs, sample.grids, sample.rectified, strict=True):
        x, y = np.moveaxis(normalized_to_pixels(grid, height, width), -1, 0)
        padded = np.pad(image, 1)  # zeros around, so edge pixels blend towards 0 as in the model
        expected = ndimage.map_coordinates(padded, [y + 1, x + 1], order=1, mode="constant")
        np.testing.assert_allclose(rectified, expected, atol=1e-4)
    # Training curves: one value per epoch (4 steps of 2 per epoch = 2 epochs), train and eval.
    assert set(facts.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(facts.history[name]) == 2 for name in ("loss", "val_loss"))
    assert facts.results.blessed is True


@pytest.mark.slow
def test_unknown_run_is_a_clear_error(tiny_run):
    config = tiny_run["config"]
    (run_id,) = report.run_ids(config)
    with pytest.raises(ValueError, match=f"--run 'nope': no such run; runs: {run_id}"):
        report.collect_facts(config, "nope")


def test_span_labels_name_one_span_or_a_window():
    assert summary.span_label((3,)) == "span 3"
    assert summary.span_label((2, 3, 4)) == "spans 2, 3, 4"


def test_the_summary_names_the_first_skipped_inputs_and_counts_the_rest():
    skipped = [
        f"/data/span-1/train/1/{index:02d}.png is not a PNG or JPEG file" for index in range(25)
    ]
    results = dataclasses.replace(hand_built_facts().results, skipped=skipped)
    text = summary.format_report(results)
    assert "skipped: 25 bad input(s) (max_bad_files allows it)" in text
    listed = [line for line in text.splitlines() if line.startswith("  - /data/")]
    assert listed == [f"  - {line}" for line in skipped[:20]]
    assert "  - ... and 5 more" in text


def test_a_run_without_statistics_says_so_instead_of_an_empty_count(tmp_path):
    results = dataclasses.replace(hand_built_facts().results, spans=[((1,), {})])
    words = "no example counts: StatisticsGen did not finish"
    assert f"data: span 1 ({words})" in summary.format_report(results)
    facts = dataclasses.replace(hand_built_facts(), results=results, samples=[])
    with open(report.write_report(facts, tmp_path), encoding="utf-8") as page:
        assert f"<li>span 1: {words}</li>" in page.read()


def test_a_run_stopped_before_validation_says_its_data_was_not_checked():
    nodes = {"ImageExampleGen": summary.NodeRun("ImageExampleGen", "FAILED", 1.0, {})}
    assert summary._anomalies(nodes, num_classes=10) is None
    results = dataclasses.replace(hand_built_facts().results, anomalies=None)
    assert "anomalies: not checked (the data was not validated)" in summary.format_report(results)
    assert "anomalies: none" not in summary.format_report(results)
