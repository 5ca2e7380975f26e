"""End to end: `stn-pipeline run` on a tiny data set, twice, in fresh processes (about two minutes).

The first run trains a small model, is blessed on the accuracy floor alone (no baseline yet)
and pushed; the pushed SavedModel classifies the eval PNGs from disk. The second run, with a
crippled trainer (one step), reuses the cached data components, is not blessed against the
baseline, and leaves `serving/` as it was. The configuration tests at the end are fast.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import spans, summary
from pipeline.configs import load_config
from pipeline.pipeline import eval_config

FLOOR = 0.15  # chance is 0.10; with 600 eval images its standard deviation is 0.012
CONFIG = f"""
model: cnn
batch_size: 32
train_steps: 120
learning_rate: 0.003
accuracy_floor: {FLOOR}
regression_tolerance: 0.05
max_bad_files: 1
"""


def stn_run(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def tree(folder):
    """{relative path: (size, mtime)} of every file under `folder`."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in Path(folder).rglob("*")
        if path.is_file()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data, home = root / "data", root / "home"
    spans.write_span(data, span=1, copies=2, per_class=30, report=lambda line: None)
    (data / "span-1" / "train" / "3" / "cut-short.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    config_file = root / "config.yaml"
    config_file.write_text(CONFIG)
    common = ["--home", str(home), "--data-root", str(data), "--config", str(config_file)]
    first = stn_run(*common)
    assert first.returncode == 0, first.stdout + first.stderr
    config = load_config(str(config_file), home=str(home), data_root=str(data))
    first_nodes = summary.latest_node_runs(config.metadata_path, config.pipeline_name)
    serving_before = tree(config.serving_dir)
    second = stn_run(*common, "--train-steps", "1")
    assert second.returncode == 0, second.stdout + second.stderr
    second_nodes = summary.latest_node_runs(config.metadata_path, config.pipeline_name)
    return {
        "data": data,
        "config": config,
        "first": first,
        "first_nodes": first_nodes,
        "serving_before": serving_before,
        "second": second,
        "second_nodes": second_nodes,
    }


def test_first_run_is_blessed_and_pushed(runs):
    config, out = runs["config"], runs["first"].stdout
    assert "model: BLESSED" in out
    assert "no baseline: no model approved before" in out
    cut_short = runs["data"] / "span-1" / "train" / "3" / "cut-short.png"
    assert "skipped: 1 bad input(s) (max_bad_files allows it)" in out
    assert f"  - {cut_short} is not a decodable PNG image" in out
    for component in ("ImageExampleGen", "StatisticsGen", "Trainer", "Evaluator", "Pusher"):
        assert f"{component} done in" in out
    assert os.path.isfile(config.metadata_path)
    versions = summary.served_versions(config.serving_dir)
    assert len(versions) == 1
    pushed = os.path.join(config.serving_dir, versions[0])
    assert f"push: {pushed}" in out
    assert os.path.isfile(os.path.join(pushed, "saved_model.pb"))
    nodes = runs["first_nodes"]
    assert {node.state for node in nodes.values()} == {"COMPLETE"}
    for node_id in ("ImageExampleGen", "Trainer", "Evaluator", "ModelCheck", "Pusher"):
        for artifacts in nodes[node_id].outputs.values():
            assert all(os.path.exists(artifact.uri) for artifact in artifacts)


def test_pushed_model_classifies_png_bytes(runs):
    import tensorflow as tf

    config = runs["config"]
    version = summary.served_versions(config.serving_dir)[0]
    loaded = tf.saved_model.load(os.path.join(config.serving_dir, version))
    files = sorted((runs["data"] / "span-1" / "eval").glob("*/*.png"))
    labels = np.array([int(path.parent.name) for path in files])
    images = tf.constant([path.read_bytes() for path in files])
    answer = loaded.signatures["serving_default"](images=images)
    assert answer["probabilities"].shape == (len(files), 10)
    assert answer["classes"].dtype == tf.int64
    accuracy = float(np.mean(answer["classes"].numpy() == labels))
    # The summary's overall accuracy (TFMA on the same eval split) is what we measure here.
    overall = next(
        line for line in runs["first"].stdout.splitlines() if line.strip().startswith("Overall")
    )
    assert accuracy >= FLOOR
    assert float(overall.split()[-1]) == pytest.approx(accuracy, abs=1e-4)


def test_crippled_second_run_is_not_pushed(runs):
    config, out = runs["config"], runs["second"].stdout
    assert "model: NOT BLESSED" in out
    assert "against the baseline" in out or "below the floor" in out
    assert "not pushed: the Evaluator did not bless the model" in out
    version = summary.served_versions(config.serving_dir)[0]
    assert f"serving keeps version {version}" in out
    assert tree(config.serving_dir) == runs["serving_before"]
    # The summary shows the baseline's accuracy beside the candidate's.
    assert "baseline" in out.split("eval metrics")[1].splitlines()[1]


def test_the_blessing_rule_is_the_one_the_runs_evaluator_applied(runs):
    # A report made with another config (here the defaults) still shows the run's own rule.
    other = dataclasses.replace(runs["config"], accuracy_floor=0.9, regression_tolerance=0.01)
    why = summary.run_report(other).why
    assert why[0] == f"failed: eval accuracy >= {FLOOR} and at most 0.05 below the baseline"
    assert (
        "failed: eval accuracy >= 0.15 and at most 0.05 below the baseline" in runs["second"].stdout
    )


def test_second_run_reuses_cached_components(runs):
    first, second = runs["first_nodes"], runs["second_nodes"]
    for node_id in ("ImageExampleGen", "StatisticsGen", "ExampleValidator", "AnomalyGate"):
        assert second[node_id].state == "CACHED"
        assert second[node_id].outputs.keys() == first[node_id].outputs.keys()
        for key, artifacts in second[node_id].outputs.items():
            assert [a.id for a in artifacts] == [a.id for a in first[node_id].outputs[key]]
    assert second["Trainer"].state == "COMPLETE"
    assert "ImageExampleGen cached in" in runs["second"].stdout


@pytest.mark.slow
def test_a_model_the_check_refused_is_never_the_next_runs_baseline(tmp_path):
    data, home = tmp_path / "data", tmp_path / "home"
    spans.write_span(data, span=1, copies=1, per_class=3, report=lambda line: None)
    common = ["--home", str(home), "--data-root", str(data), "--train-steps", "2"]
    config = tmp_path / "c.yaml"
    config.write_text("accuracy_floor: 0.0\nmodel_check_timeout_s: 1\n")  # it cannot load in 1 s
    refused = stn_run(*common, "--config", str(config))
    assert refused.returncode == 0, refused.stderr
    assert "model: BLESSED" in refused.stdout
    assert (
        "not pushed: the model check failed: the model did not answer within 1 s" in refused.stdout
    )
    config.write_text("accuracy_floor: 0.0\n")
    second = stn_run(*common, "--config", str(config))
    assert second.returncode == 0, second.stderr
    assert "no baseline: no model approved before" in second.stdout  # not the refused one
    assert "push: " in second.stdout and "not pushed" not in second.stdout


DECOY = "import sys\nprint('the decoy ran', file=sys.stderr)\nsys.exit(3)\n"


def test_the_model_check_runs_the_installed_module_not_one_in_the_working_directory(
    tmp_path, monkeypatch
):
    from components.model_check import check_in_fresh_process

    (tmp_path / "components").mkdir()
    (tmp_path / "components" / "__init__.py").write_text("")
    (tmp_path / "components" / "model_check.py").write_text(DECOY)
    monkeypatch.chdir(tmp_path)
    passed, reason = check_in_fresh_process(str(tmp_path / "no-model"))
    assert not passed and "decoy" not in reason and "no-model" in reason


def test_failing_component_exits_non_zero_with_its_error(tmp_path):
    empty = tmp_path / "no-spans"
    empty.mkdir()
    done = stn_run("--home", str(tmp_path / "home"), "--data-root", str(empty))
    assert done.returncode == 1
    assert "FAILED: ImageExampleGen:" in done.stderr
    assert "found no input under" in done.stderr
    # Its driver failed, which TFX leaves RUNNING: neither still going nor killed.
    stopped = "not pushed: the pipeline stopped before the Pusher (ImageExampleGen failed)"
    assert stopped in done.stdout
    config = load_config(None, home=str(tmp_path / "home"))
    assert summary.run_report(config).push_note.startswith(stopped)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\nmodel: cnn\nbeam_args: [--runner=FlinkRunner, --parallelism=4]\n")
    config = load_config(str(path), epochs=3, home=str(tmp_path / "h"))
    assert (config.epochs, config.model) == (3, "cnn")
    assert config.data_dir == str(tmp_path / "h" / "data")
    assert config.metadata_path == str(tmp_path / "h" / "metadata.sqlite")
    assert config.serving_dir == str(tmp_path / "h" / "serving" / "stn")
    # Another runner's arguments pass through unchanged; DirectRunner gets its settings.
    assert config.beam_pipeline_args() == ["--runner=FlinkRunner", "--parallelism=4"]
    direct = load_config(direct_running_mode="multi_processing", direct_num_workers=2)
    assert direct.beam_pipeline_args() == [
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
    ]


def test_the_model_options_of_a_config_file_reach_the_trainer(tmp_path):
    recipe = {"st_iterations": 2, "full_resolution_localization": True}
    recipe |= {"localization_hidden_units": 50, "equivariance_weight": 1.0}
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{name}: {str(value).lower()}\n" for name, value in recipe.items()))
    custom_config = load_config(str(path)).trainer_custom_config()
    assert {name: custom_config[name] for name in recipe} == recipe


def test_workers_choose_the_trainer_and_spans_the_inputs(tmp_path):
    from components.multiworker_trainer import MultiWorkerTrainer
    from pipeline.pipeline import create_pipeline
    from stn_model.trainer import TrainingOptions, training_code_digest

    def nodes(**overrides):
        config = load_config(home=str(tmp_path), **overrides)
        return {node.id: node for node in create_pipeline(config).components}

    def ingest_settings(node):
        return json.loads(node.exec_properties["custom_config"])["custom_config"]["value"]

    plain = nodes()
    assert type(plain["Trainer"]) is not MultiWorkerTrainer
    # The training code's digest keys the Trainer's cache, and run_fn accepts it.
    trainer_options = json.loads(plain["Trainer"].exec_properties["custom_config"])
    assert trainer_options["code_digest"] == training_code_digest()
    assert TrainingOptions.from_custom_config(trainer_options).model == "st_cnn_affine"
    assert not plain["ImageExampleGen"].exec_properties["range_config"]
    assert "span_window" not in ingest_settings(plain["ImageExampleGen"])
    two = nodes(multiworker={"num_workers": 2}, span=3, span_window=2)
    assert isinstance(two["Trainer"], MultiWorkerTrainer)
    custom_config = json.loads(two["Trainer"].exec_properties["custom_config"])
    assert custom_config["multiworker"]["num_workers"] == 2
    static = json.loads(two["ImageExampleGen"].exec_properties["range_config"])["static_range"]
    assert static == {"start_span_number": 3, "end_span_number": 3}
    # The window is ingested (and validated) by ImageExampleGen itself: no resolver.
    assert ingest_settings(two["ImageExampleGen"])["span_window"] == 2
    assert [node for node in two if "resolver" in node] == ["latest_blessed_model_resolver"]
    examples = two["ImageExampleGen"].outputs["examples"]
    assert two["Trainer"].inputs["examples"] is examples
    assert two["StatisticsGen"].inputs["examples"] is examples


def test_the_baseline_is_approved_after_the_push_not_before_it(tmp_path):
    from pipeline.pipeline import create_pipeline

    config = load_config(home=str(tmp_path))
    nodes = {node.id: node for node in create_pipeline(config).components}
    blessings = nodes["latest_blessed_model_resolver"].raw_inputs["model_blessing"]
    # A model the Pusher failed to push (a full disk, a killed run) is never a baseline.
    assert nodes["Pusher"] in nodes[blessings.producer_component_id].upstream_nodes


@pytest.mark.parametrize("pushed", [0, 1])
def test_push_approval_approves_a_pushed_model_only(tmp_path, pushed):
    from tfx.components.util import model_utils
    from tfx.types import standard_artifacts

    from components.model_check import PushApproval

    model, pushed_model = standard_artifacts.Model(), standard_artifacts.PushedModel()
    model.id = 7
    pushed_model.set_int_custom_property("pushed", pushed)
    approval = standard_artifacts.ModelBlessing()
    approval.uri = str(tmp_path)
    approve = PushApproval.EXECUTOR_SPEC.executor_class._FUNCTION
    approve(model=model, pushed_model=pushed_model, approval=approval)
    assert model_utils.is_model_blessed(approval) == bool(pushed)
    assert approval.get_int_custom_property("current_model_id") == 7


def test_multiworker_settings_are_checked_when_the_config_loads(tmp_path):
    assert load_config().multiworker_config().num_workers == 1
    assert not load_config().uses_multiworker_trainer
    path = tmp_path / "c.yaml"
    path.write_text("multiworker: {num_workers: 0}\n")
    with pytest.raises(ValueError, match="'multiworker': num_workers must be an integer >= 1"):
        load_config(str(path))
    for field, message in (
        ("num_workers", "num_workers must be an integer >= 1, got True"),
        ("max_restarts", "max_restarts must be an integer >= 0, got True"),
    ):
        path.write_text(f"multiworker: {{{field}: true}}\n")
        with pytest.raises(ValueError, match=f"'multiworker': {message}"):
            load_config(str(path))
    with pytest.raises(ValueError, match="'multiworker': backend 'kubernetes' needs"):
        load_config(multiworker={"backend": "kubernetes"})
    with pytest.raises(ValueError, match=r"'multiworker': multiworker\.kubernetes: unknown"):
        load_config(multiworker={"kubernetes": {"img": "x"}})
    with pytest.raises(ValueError, match="'span_window' must be >= 1"):
        load_config(span_window=0)


@pytest.mark.parametrize("command", ["run", "watch"])
def test_worker_options_override_the_config_files_multiworker(tmp_path, command):
    from pipeline import run_cmd
    from pipeline.cli import build_parser

    path = tmp_path / "c.yaml"
    path.write_text("multiworker: {max_restarts: 0, num_workers: 4}\n")
    argv = [command, "--config", str(path), "--data-root", str(tmp_path)]
    args = build_parser().parse_args([*argv, "--workers", "2", "--mixed-precision"])
    assert run_cmd.config_from_args(args).multiworker == {
        "max_restarts": 0,
        "num_workers": 2,
        "mixed_precision": True,
    }
    unchanged = run_cmd.config_from_args(build_parser().parse_args(argv))
    assert unchanged.multiworker == {"max_restarts": 0, "num_workers": 4}
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--backend", "slurm"])


def test_mixed_precision_with_the_stock_trainer_is_refused_not_ignored(tmp_path, capsys):
    from pipeline import cli

    with pytest.raises(ValueError, match=r"mixed_precision \(--mixed-precision\) needs the"):
        load_config(multiworker={"mixed_precision": True})
    assert load_config(multiworker={"mixed_precision": True, "num_workers": 2}).multiworker
    argv = ["run", "--home", str(tmp_path / "home"), "--mixed-precision"]
    assert cli.main(argv) == 2
    assert "stn-pipeline run: config field 'multiworker'" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()  # refused before the default data set is made


@pytest.mark.parametrize(
    ("correct", "baseline_correct", "examples", "blessed"),
    [
        (900, None, 1000, True),
        (899, None, 1000, False),
        (960, 970, 1000, True),
        (959, 970, 1000, False),
        (900_000, None, 10**6, True),
        (899_999, None, 10**6, False),
        (959_999, 970_000, 10**6, False),
    ],
    ids=[
        "at the floor",
        "below it",
        "at the tolerance",
        "beyond it",
        "at the floor of a million",
        "one of a million below it",
        "one of a million beyond the tolerance",
    ],
)
def test_blessing_bounds_are_inclusive_in_tfmas_float32(
    correct, baseline_correct, examples, blessed
):
    # The Evaluator's validation, fed TFMA's float32 accuracies (floor 0.9, tolerance 0.01):
    # the bounds are the config's, not a float32 rounding below them, nor an example beyond.
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.evaluators import metrics_validator
    from tensorflow_model_analysis.utils import config_util

    has_baseline = baseline_correct is not None
    name = "candidate" if has_baseline else ""  # a single model has no name in TFMA's keys
    config = eval_config(load_config(None, {}))
    config.model_specs[0].name = name
    accuracy = np.float32(correct / examples)
    key = tfma.metrics.MetricKey(name="sparse_categorical_accuracy", model_name=name)
    metrics = {key: float(accuracy)}
    if has_baseline:
        config.model_specs.append(tfma.ModelSpec(name="baseline", is_baseline=True))
        diff = tfma.metrics.MetricKey(key.name, model_name=name, is_diff=True)
        metrics[diff] = float(accuracy) - float(np.float32(baseline_correct / examples))
    config = config_util.update_eval_config_with_defaults(
        config, has_baseline=has_baseline, rubber_stamp=not has_baseline
    )
    assert metrics_validator.validate_metrics(((), metrics), config).validation_ok == blessed


def test_the_blessing_thresholds_read_back_from_an_eval_config_with_or_without_the_slack():
    from pipeline.pipeline import blessing_thresholds

    config = load_config(None, {"accuracy_floor": 0.85, "regression_tolerance": 0.02})
    assert blessing_thresholds(eval_config(config)) == (0.85, 0.02)
    before_the_slack = eval_config(config)  # as runs before it recorded the bounds
    threshold = before_the_slack.metrics_specs[0].metrics[1].per_slice_thresholds[0].threshold
    threshold.value_threshold.lower_bound.value = 0.85
    threshold.change_threshold.absolute.value = -0.02
    assert blessing_thresholds(before_the_slack) == (0.85, 0.02)


def test_uris_with_a_scheme_stay_as_they_are():
    config = load_config(home="gs://bucket/stn", data_root="s3://data/root")
    assert config.home_dir == "gs://bucket/stn"
    assert config.data_dir == "s3://data/root"
    assert config.pipeline_root == "gs://bucket/stn/pipeline_root"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epoch: 3\n", "unknown config field\\(s\\) \\['epoch'\\]"),
        ("epochs: three\n", "'epochs' must be an integer"),
        ("accuracy_floor: 1.5\n", "'accuracy_floor' must be in \\[0, 1\\]"),
        ("model: resnet\n", "'model' must be one of"),
        ("st_iterations: 0\n", "'st_iterations' must be >= 1"),
        ("full_resolution_localization: 1\n", "'full_resolution_localization' must be true or"),
        ("localization_hidden_units: 0\n", "'localization_hidden_units' must be >= 1"),
        ("model: cnn\nequivariance_weight: 1\n", "'equivariance_weight' needs a model of"),
        ("model: cnn\nst_iterations: 2\n", "'st_iterations' needs a model of"),
        ("model: st_fcn\nlocalization_hidden_units: 50\n", "'localization_hidden_units' needs"),
        ("model: fcn\nfull_resolution_localization: true\n", "'full_resolution_localization' n"),
        ("equivariance_weight: -1\n", "'equivariance_weight' must be >= 0"),
        ("equivariance_angle: 0\n", "'equivariance_angle' must be in \\(0, 180\\]"),
        ("- just a list\n", "must hold a mapping"),
    ],
)
def test_bad_config_file_names_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_config(str(path))
    assert str(path) in str(error.value)


def test_two_worker_run_is_blessed_and_pushed(tmp_path):
    data, home = tmp_path / "data", tmp_path / "home"
    spans.write_span(data, span=1, copies=2, per_class=30, report=lambda line: None)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(CONFIG)
    done = stn_run(
        "--home",
        str(home),
        "--data-root",
        str(data),
        "--config",
        str(config_file),
        "--workers",
        "2",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model: BLESSED" in done.stdout
    config = load_config(str(config_file), home=str(home), data_root=str(data))
    versions = summary.served_versions(config.serving_dir)
    assert len(versions) == 1
    assert os.path.isfile(os.path.join(config.serving_dir, versions[0], "saved_model.pb"))
    # The multi-worker executor ran: it leaves the workers' spec in the model run dir.
    specs = list((home / "pipeline_root" / "Trainer" / "model_run").glob("*/multiworker_spec.json"))
    assert len(specs) == 1
