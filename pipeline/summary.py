"""What a person sees of a pipeline run: progress while it runs, a summary at the end.

`Progress` is a logging handler that follows the runner's ``Component X is running/finished``
lines and prints one line per component (cached or not, seconds taken); `run_report` reads the
latest run's artifacts from ML Metadata (spans, anomalies, TFMA metrics and validation, the
model check, the push) and `format_report` turns them into text.
"""

import dataclasses
import logging
import os
import sys
import time

_RUNNING = "Component %s is running."
_FINISHED = "Component %s is finished."
_CACHED = "A cached execution %d is used."
NOT_VALIDATED = "not checked (the data was not validated)"


class Progress(logging.Handler):
    """Prints ``[i/n] Component ...`` lines as the local runner goes; keeps the timings."""

    def __init__(self, component_ids, stream=None):
        super().__init__(level=logging.INFO)
        self.component_ids = list(component_ids)
        self.stream = stream or sys.stdout
        self.current = None
        self.started = None
        self.cached = False
        self.timings = {}  # component id -> (seconds, cached)

    def emit(self, record):
        if record.msg == _RUNNING and record.args:
            self.current, self.started, self.cached = record.args[0], time.monotonic(), False
            self._print(f"{self._position()} {self.current} running ...")
        elif record.msg == _CACHED:
            self.cached = True
        elif record.msg == _FINISHED and record.args and record.args[0] == self.current:
            seconds = time.monotonic() - self.started
            self.timings[self.current] = (seconds, self.cached)
            how = "cached" if self.cached else "done"
            self._print(f"{self._position()} {self.current} {how} in {seconds:.1f} s")
            self.current = None

    def _position(self):
        total = len(self.component_ids)
        index = (
            self.component_ids.index(self.current) + 1
            if self.current in self.component_ids
            else "?"
        )
        return f"[{index}/{total}]"

    def _print(self, line):
        print(line, file=self.stream, flush=True)


# --- reading the latest run back from ML Metadata ------------------------------------------


@dataclasses.dataclass
class NodeRun:
    """The latest execution of one pipeline node and its output artifacts (MLMD protos)."""

    node_id: str
    state: str
    seconds: float
    outputs: dict  # output key -> [metadata_store_pb2.Artifact]
    properties: dict = dataclasses.field(default_factory=dict)  # the execution's, e.g. num_classes


def metadata_store(metadata_path):
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    if not os.path.exists(metadata_path):
        raise ValueError(f"no ML Metadata database at {metadata_path}")
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    try:
        return metadata_store.MetadataStore(config)
    except RuntimeError as error:  # not an SQLite file, a folder, ...
        raise ValueError(f"cannot open the ML Metadata database {metadata_path}: {error}") from None


def run_ids(metadata_path, pipeline_name):
    """The ids of the pipeline's runs recorded in ML Metadata, oldest first."""
    return [run.name for run in _pipeline_runs(metadata_store(metadata_path), pipeline_name)]


def latest_node_runs(metadata_path, pipeline_name, run_id=None):
    """{node id: NodeRun} of the latest pipeline run, or of run `run_id` (cached executions
    count as run)."""
    from ml_metadata.proto import metadata_store_pb2

    store = metadata_store(metadata_path)
    runs = _pipeline_runs(store, pipeline_name)
    if run_id is not None:
        chosen = [run for run in runs if run.name == run_id]
        if not chosen:
            known = ", ".join(run.name for run in runs) or "none"
            raise ValueError(f"run {run_id!r}: no such run of {pipeline_name}; runs: {known}")
        runs = chosen
    if not runs:
        return {}
    executions = store.get_executions_by_context(runs[-1].id)
    node_of = {}
    for execution in executions:
        for context in store.get_contexts_by_execution(execution.id):
            if context.name.startswith(pipeline_name + "."):
                node_of[execution.id] = context.name[len(pipeline_name) + 1 :]
    events = store.get_events_by_execution_ids([e.id for e in executions])
    outputs = {execution.id: {} for execution in executions}
    artifact_ids = [e.artifact_id for e in events if e.type == metadata_store_pb2.Event.OUTPUT]
    artifacts = {a.id: a for a in store.get_artifacts_by_id(artifact_ids)}
    for event in events:
        if event.type == metadata_store_pb2.Event.OUTPUT and event.path.steps:
            key = event.path.steps[0].key
            outputs[event.execution_id].setdefault(key, []).append(artifacts[event.artifact_id])
    state_names = metadata_store_pb2.Execution.State.Name
    result = {}
    for execution in sorted(executions, key=lambda e: e.id):
        node_id = node_of.get(execution.id, str(execution.type))
        result[node_id] = NodeRun(
            node_id=node_id,
            state=state_names(execution.last_known_state),
            seconds=(execution.last_update_time_since_epoch - execution.create_time_since_epoch)
            / 1000.0,
            outputs=outputs[execution.id],
            properties={name: _value(value) for name, value in execution.custom_properties.items()},
        )
    return result


def _pipeline_runs(store, pipeline_name):
    """The pipeline's run contexts, oldest first."""
    runs = store.get_contexts_by_type("pipeline_run")
    runs = [run for run in runs if _run_belongs(store, run, pipeline_name)]
    return sorted(runs, key=lambda run: (run.create_time_since_epoch, run.id))


def _run_belongs(store, run, pipeline_name):
    parents = store.get_parent_contexts_by_context(run.id)
    return not parents or any(parent.name == pipeline_name for parent in parents)


def _artifact(node, key):
    artifacts = node.outputs.get(key, []) if node else []
    return artifacts[0] if artifacts else None


def _value(value):
    """The Python value of an MLMD property Value."""
    return getattr(value, value.WhichOneof("value"))


def _prop(artifact, name, default=None):
    for properties in (artifact.custom_properties, artifact.properties):
        if name in properties:
            return _value(properties[name])
    return default


# --- the report ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunReport:
    spans: list  # (spans ingested together, {split: example count})
    anomalies: list | None  # sentences; empty when the data passed, None if not validated
    metrics: dict  # slice name -> {"candidate": acc, "baseline": acc, "examples": n}
    blessed: bool | None  # None: the Evaluator did not run
    why: list  # sentences explaining the blessing
    pushed_to: str | None
    push_note: str
    timings: dict  # node id -> (seconds, state)
    skipped: list = dataclasses.field(default_factory=list)  # bad inputs skipped, a line each


def run_report(config, run_id=None):
    """The `RunReport` of the latest run of `config`'s pipeline, or of run `run_id`."""
    nodes = latest_node_runs(config.metadata_path, config.pipeline_name, run_id)
    latest = run_id is None or run_id == run_ids(config.metadata_path, config.pipeline_name)[-1]
    examples = _examples(nodes)
    return RunReport(
        spans=_spans(examples, nodes),
        anomalies=_anomalies(nodes, _num_classes(nodes, config), examples),
        metrics=_metrics(nodes),
        blessed=_blessed(nodes),
        why=_why(nodes),
        pushed_to=_pushed_to(nodes),
        push_note=_push_note(nodes, config, latest),
        timings={node.node_id: (node.seconds, node.state) for node in nodes.values()},
        skipped=_skipped(examples),
    )


def _examples(nodes):
    """ImageExampleGen's output as a TFX Examples artifact, or None."""
    from tfx.types import standard_artifacts

    examples = _artifact(nodes.get("ImageExampleGen"), "examples")
    if examples is None:
        return None
    artifact = standard_artifacts.Examples()
    artifact.set_mlmd_artifact(examples)
    return artifact


def _spans(examples, nodes):
    from tfx.components.statistics_gen.stats_artifact_utils import load_statistics
    from tfx.types import artifact_utils, standard_artifacts

    from components.image_example_gen import ingested_spans

    statistics = _artifact(nodes.get("StatisticsGen"), "statistics")
    if examples is None:
        return []
    counts = {}
    if statistics is not None:
        stats = standard_artifacts.ExampleStatistics()
        stats.set_mlmd_artifact(statistics)
        for split in artifact_utils.decode_split_names(stats.split_names):
            counts[split] = load_statistics(stats, split).proto().datasets[0].num_examples
    return [(ingested_spans(examples), counts)]


def _skipped(examples):
    from components.image_example_gen import SKIPPED_FILES_PROPERTY

    if examples is None:
        return []
    return list(examples.get_json_value_custom_property(SKIPPED_FILES_PROPERTY) or [])


def span_label(spans):
    """`span 3`, or `spans 2, 3` for a window ingested together."""
    return f"span {spans[0]}" if len(spans) == 1 else "spans " + ", ".join(map(str, spans))


def example_counts(counts):
    """`train 4,500, eval 500 examples`, or why there are no counts."""
    if not counts:
        return "no example counts: StatisticsGen did not finish"
    return ", ".join(f"{split} {count:,}" for split, count in counts.items()) + " examples"


def _num_classes(nodes, config):
    """The num_classes the run's AnomalyGate checked labels against (the config's when the
    gate did not run), so an older run is judged by its own setting."""
    gate = nodes.get("AnomalyGate")
    return gate.properties.get("num_classes", config.num_classes) if gate else config.num_classes


def _anomalies(nodes, num_classes, examples=None):
    """The gate's problems: ExampleValidator's anomalies, what the statistics show and, when
    the gate failed, images `examples` holds in two splits (read only then: a passed gate found
    none); None when the data was not validated."""
    from tfx.types import standard_artifacts

    from components.gate import gate_problems

    anomalies = _artifact(nodes.get("ExampleValidator"), "anomalies")
    statistics = _artifact(nodes.get("StatisticsGen"), "statistics")
    if anomalies is None or statistics is None:
        return None
    artifacts = standard_artifacts.ExampleAnomalies(), standard_artifacts.ExampleStatistics()
    for artifact, mlmd_artifact in zip(artifacts, (anomalies, statistics), strict=True):
        artifact.set_mlmd_artifact(mlmd_artifact)
    gate = nodes.get("AnomalyGate")
    if gate is None or gate.state != "FAILED":
        examples = None
    return gate_problems(*artifacts, num_classes=num_classes, examples=examples)


def _slice_name(slice_key):
    from tensorflow_model_analysis.slicer import slicer_lib

    return slicer_lib.stringify_slice_key(slicer_lib.deserialize_slice_key(slice_key))


def _metrics(nodes):
    import tensorflow_model_analysis as tfma

    evaluation = _artifact(nodes.get("Evaluator"), "evaluation")
    if evaluation is None:
        return {}
    table = {}
    for record in tfma.load_metrics(evaluation.uri):
        row = table.setdefault(_slice_name(record.slice_key), {})
        for item in record.metric_keys_and_values:
            if item.key.is_diff or not item.value.HasField("double_value"):
                continue
            model = "baseline" if item.key.model_name == "baseline" else "candidate"
            if item.key.name == "sparse_categorical_accuracy":
                row[model] = item.value.double_value.value
            elif item.key.name == "example_count" and model == "candidate":
                row["examples"] = int(item.value.double_value.value)
    return dict(sorted(table.items(), key=lambda item: (item[0] != "Overall", item[0])))


def _blessed(nodes):
    blessing = _artifact(nodes.get("Evaluator"), "blessing")
    return None if blessing is None else _prop(blessing, "blessed") == 1


def _why(nodes):
    """The blessing rule the run's Evaluator applied (its own EvalConfig), and the outcome."""
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.writers.eval_config_writer import load_eval_run

    from pipeline.pipeline import blessing_thresholds

    evaluation = _artifact(nodes.get("Evaluator"), "evaluation")
    if evaluation is None:
        return ["the Evaluator did not run"]
    blessing = _artifact(nodes.get("Evaluator"), "blessing")
    has_baseline = bool(_prop(blessing, "baseline_model", "")) if blessing else False
    accuracy_floor, regression_tolerance = blessing_thresholds(load_eval_run(evaluation.uri)[0])
    floor = f"eval accuracy >= {accuracy_floor:g}"
    rule = (
        f"{floor} and at most {regression_tolerance:g} below the baseline"
        if has_baseline
        else f"{floor} (no baseline: no model approved before)"
    )
    result = tfma.load_validation_result(evaluation.uri)
    if result.validation_ok:
        return [f"passed: {rule}"]
    reasons = [f"failed: {rule}"]
    for per_slice in result.metric_validations_per_slice:
        where = _slice_name(per_slice.slice_key)
        for failure in per_slice.failures:
            value = failure.metric_value.double_value.value
            if failure.metric_key.is_diff:
                reasons.append(f"{where}: accuracy changed by {value:+.4f} against the baseline")
            else:
                reasons.append(f"{where}: accuracy {value:.4f} is below the floor")
    return reasons


def _pushed_to(nodes):
    pushed = _artifact(nodes.get("Pusher"), "pushed_model")
    if pushed is None or _prop(pushed, "pushed") != 1:
        return None
    return _prop(pushed, "pushed_destination")


def _push_note(nodes, config, latest=True):
    """Why the run pushed nothing, and what is served; `latest` False: an earlier run, which
    ended before the next one began and may predate what is served now."""
    if _pushed_to(nodes):
        return "pushed"
    check = _artifact(nodes.get("ModelCheck"), "infra_blessing")
    if _blessed(nodes) is False:
        why = "the Evaluator did not bless the model"
    elif check is not None and _prop(check, "blessed") != 1:
        why = f"the model check failed: {_prop(check, 'reason', '')}"
    elif any(node.state in ("NEW", "RUNNING") for node in nodes.values()):
        why = (
            "the run is still going (report it again when it ends)"
            if latest and _run_going(config)
            else "the run was stopped (killed or interrupted) before the Pusher"
        )
    elif nodes.get("Pusher") is None:
        failed = [node.node_id for node in nodes.values() if node.state == "FAILED"]
        at = f" ({', '.join(failed)} failed)" if failed else ""
        why = f"the pipeline stopped before the Pusher{at}"
    else:
        why = "the Pusher did not push"
    versions = served_versions(config.serving_dir)
    if not latest:
        serving = f"version {versions[-1]} is served now" if versions else "nothing is served now"
    else:
        serving = f"serving keeps version {versions[-1]}" if versions else "nothing is served yet"
    return f"not pushed: {why}; {serving}"


def _run_going(config):
    """Whether a run or watcher holds `config`'s home: a run left RUNNING by one that was killed
    is not going."""
    from pipeline import watcher

    return watcher.lock_held(os.path.join(config.home_dir, watcher.LOCK_FILE))


def served_versions(serving_dir):
    """The version folders under `serving_dir`, oldest first."""
    if not os.path.isdir(serving_dir):
        return []
    from pipeline.configs import is_version_name

    return sorted(filter(is_version_name, os.listdir(serving_dir)), key=int)


def format_report(report):
    """The end-of-run summary as text."""
    lines = ["", "== Summary"]
    for spans, counts in report.spans:
        lines.append(f"data: {span_label(spans)} ({example_counts(counts)})")
    if report.skipped:
        from components.image_example_gen import listed

        lines.append(f"skipped: {len(report.skipped)} bad input(s) (max_bad_files allows it)")
        lines.extend(f"  - {line}" for line in listed(report.skipped))
    if report.anomalies is None:
        lines.append(f"anomalies: {NOT_VALIDATED}")
    elif report.anomalies:
        lines.append(f"anomalies: {len(report.anomalies)}")
        lines.extend(f"  - {sentence}" for sentence in report.anomalies)
    else:
        lines.append("anomalies: none")
    if report.metrics:
        with_baseline = any("baseline" in row for row in report.metrics.values())
        header = f"{'slice':<24}{'examples':>10}{'accuracy':>10}"
        lines += [
            "eval metrics (sparse categorical accuracy):",
            "  " + header + ("  baseline" if with_baseline else ""),
        ]
        for name, row in report.metrics.items():
            accuracy = row.get("candidate", float("nan"))
            line = f"{name:<24}{row.get('examples', 0):>10,}{accuracy:>10.4f}"
            if with_baseline:
                line += f"{row.get('baseline', float('nan')):>10.4f}"
            lines.append("  " + line)
    verdict = {True: "BLESSED", False: "NOT BLESSED", None: "not evaluated"}[report.blessed]
    lines.append(f"model: {verdict}")
    lines.extend(f"  {reason}" for reason in report.why)
    lines.append(f"push: {report.pushed_to}" if report.pushed_to else f"push: {report.push_note}")
    return "\n".join(lines)
