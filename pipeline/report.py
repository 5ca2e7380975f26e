"""The run report: one pipeline run's facts, from ML Metadata and its artifacts, as an HTML page.

    facts = collect_facts(config)             # the latest run (TensorFlow, TFX, ML Metadata)
    write_report(facts, folder)               # folder/index.html + PNG figures (no TensorFlow)

`collect_facts` reuses `pipeline.summary` for the results (spans, anomalies, metrics per slice,
blessing, push) and reads the rest from the run's artifacts: eval tf.Examples of the span the
run ingested, passed through the trained model's ``rectify`` signature, which also gives the
sampling grids of its spatial transformer; the per-epoch curves of the Trainer's TensorBoard
logs.
`write_report` draws the figures with `stn_model.visualize` and writes a self-contained page:
inline CSS, only relative links to files inside the folder.
"""

import dataclasses
import glob
import html
import os
import re

import numpy as np

from pipeline import summary
from stn_model import visualize

SAMPLES_PER_VARIANT = 8


@dataclasses.dataclass
class VariantSamples:
    """Eval images of one distortion variant and what the trained model made of them."""

    variant: str
    labels: list  # true class per image
    inputs: np.ndarray  # [N, H, W] float in [0, 1]
    rectified: np.ndarray  # [N, h, w] float: what the classifier sees
    grids: np.ndarray | None = None  # [N, h, w, 2] normalized input (x, y) per output pixel


@dataclasses.dataclass
class ReportFacts:
    """Everything the page shows about one run."""

    run_id: str
    pipeline_name: str
    results: summary.RunReport
    samples: list  # [VariantSamples], one per variant
    samples_note: str  # where the pictures come from, or why there are none
    grid_note: str  # how the sampling grids were obtained, or why there are none
    history: dict  # {metric: [value per epoch]}; "val_<metric>" for the eval split
    history_note: str


# --- collecting the facts ------------------------------------------------------------------


def run_ids(config):
    """The ids of `config`'s pipeline runs recorded in ML Metadata, oldest first."""
    if not os.path.exists(config.metadata_path):
        raise ValueError(
            f"home {config.home_dir} has no pipeline run yet (no {config.metadata_path}); "
            f"run `stn-pipeline run --home {config.home}` first"
        )
    return summary.run_ids(config.metadata_path, config.pipeline_name)


def collect_facts(config, run_id=None):
    """The `ReportFacts` of the latest run of `config`'s pipeline, or of run `run_id`."""
    ids = run_ids(config)
    if not ids:
        raise ValueError(
            f"home {config.home_dir} has no run of pipeline {config.pipeline_name!r} yet; "
            f"run `stn-pipeline run --home {config.home}` first"
        )
    if run_id is not None and run_id not in ids:
        raise ValueError(f"--run {run_id!r}: no such run; runs: {', '.join(ids)}")
    run_id = run_id or ids[-1]
    nodes = summary.latest_node_runs(config.metadata_path, config.pipeline_name, run_id)
    samples, samples_note, grid_note = _samples(nodes)
    history, history_note = _history(nodes)
    return ReportFacts(
        run_id=run_id,
        pipeline_name=config.pipeline_name,
        results=summary.run_report(config, run_id),
        samples=samples,
        samples_note=samples_note,
        grid_note=grid_note,
        history=history,
        history_note=history_note,
    )


def _artifact_uri(nodes, node_id, key):
    artifact = summary._artifact(nodes.get(node_id), key)
    return None if artifact is None else artifact.uri


def _samples(nodes):
    """([VariantSamples], samples note, grid note) from the run's eval examples and model."""
    examples_uri = _artifact_uri(nodes, "ImageExampleGen", "examples")
    model_uri = _artifact_uri(nodes, "Trainer", "model")
    if examples_uri is None or model_uri is None:
        why = "no examples" if examples_uri is None else "no trained model"
        return [], f"no pictures: the run produced {why}", "no sampling grids: no trained model"
    import tensorflow as tf
    from tfx.utils import path_utils

    model_dir = path_utils.serving_model_path(model_uri)
    model = tf.saved_model.load(model_dir)
    if "rectify" not in model.signatures:
        why = f"no pictures: the trained model {model_dir} has no `rectify` signature"
        return [], why, "no sampling grids: no `rectify` signature"
    picked = pick_samples(_eval_examples(examples_uri), SAMPLES_PER_VARIANT)
    samples = []
    for variant, items in picked.items():
        encoded = [image for _, image in items]
        outputs = model.signatures["rectify"](images=tf.constant(encoded))
        samples.append(
            VariantSamples(
                variant=variant,
                labels=[label for label, _ in items],
                inputs=np.stack([_decode(image) for image in encoded]),
                rectified=outputs["rectified"].numpy()[..., 0],
                grids=outputs["grid"].numpy() if "grid" in outputs else None,
            )
        )
    note = (
        f"eval images of the ingested span ({examples_uri}), through the trained model's "
        "`rectify` signature"
    )
    if not samples:
        grid_note = "no sampling grids: no eval images"
    elif samples[0].grids is None:
        grid_note = "no sampling grids: the model has no spatial transformer (no `grid` output)"
    else:
        grid_note = "sampling grids: the `grid` output of the same signature"
    return samples, note, grid_note


def _eval_examples(examples_uri):
    """[(variant, label, encoded image)] of the eval split's gzipped tf.Examples."""
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(examples_uri, "Split-eval", "*")))
    if not files:
        raise ValueError(f"examples {examples_uri} have no eval split files")
    found = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        features = tf.train.Example.FromString(record.numpy()).features.feature
        variant = features["variant"].bytes_list.value[0].decode() if "variant" in features else ""
        found.append(
            (
                variant or "unknown",
                int(features["label"].int64_list.value[0]),
                features["image"].bytes_list.value[0],
            )
        )
    return found


def pick_samples(examples, count):
    """{variant: [(label, image)]}: up to `count` per variant, one per class before repeating."""
    by_variant = {}
    for variant, label, image in examples:
        by_variant.setdefault(variant, []).append((label, image))
    picked = {}
    for variant in sorted(by_variant):
        seen = {}
        ranked = []
        for position, (label, image) in enumerate(by_variant[variant]):
            seen[label] = seen.get(label, 0) + 1
            ranked.append((seen[label], label, position, image))
        picked[variant] = [(label, image) for _, label, _, image in sorted(ranked)[:count]]
    return picked


def _decode(encoded):
    """An encoded image -> float [H, W] in [0, 1], decoded as the model decodes its input."""
    import tensorflow as tf

    from stn_model.serving import decode_image

    size = tf.io.decode_image(encoded, expand_animations=False).shape[:2]
    return decode_image(tf.constant(encoded), size).numpy()[..., 0]


def _history(nodes):
    """({metric: [value per epoch]}, note) from the Trainer's TensorBoard event files."""
    model_run = _artifact_uri(nodes, "Trainer", "model_run")
    if model_run is None:
        return {}, "no training curves: the run has no Trainer model_run artifact"
    by_step = {}
    for folder, prefix in (("train", ""), ("validation", "val_")):
        for path in sorted(glob.glob(os.path.join(model_run, folder, "events.out.tfevents.*"))):
            for metric, epoch, number in _epoch_scalars(path):
                by_step.setdefault(prefix + metric, {})[epoch] = number
    if not by_step:
        return {}, f"no training curves: no per-epoch TensorBoard scalars under {model_run}"
    history = {name: [steps[s] for s in sorted(steps)] for name, steps in by_step.items()}
    return history, f"per-epoch TensorBoard scalars of the Trainer's logs ({model_run})"


def _epoch_scalars(path):
    """(metric, epoch, value) of the ``epoch_<metric>`` scalars of one TensorBoard event file."""
    import tensorflow as tf

    for record in tf.data.TFRecordDataset(path):  # an event file is a TFRecord file
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
            if value.tag.startswith("epoch_"):
                number = (
                    float(tf.make_ndarray(value.tensor))
                    if value.HasField("tensor")
                    else value.simple_value
                )
                yield value.tag.removeprefix("epoch_"), event.step, number


# --- the page ------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.note { color: #666; font-size: 0.9em; } .ok { color: #080; } .bad { color: #b00; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
"""


def folder_name(run_id):
    """A file-system-safe folder name for a run id (letters, digits, '.', '_', '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip(".-")
    if not name:
        raise ValueError(f"run id {run_id!r} gives no usable folder name")
    return name


def write_report(facts, folder):
    """Write `folder`/index.html and its PNG figures for `facts`; return the page's path."""
    os.makedirs(folder, exist_ok=True)
    sections = [
        _data_section(facts.results),
        _pictures_section(facts, folder),
        _curves_section(facts, folder),
        _metrics_section(facts.results, folder),
        _anomalies_section(facts.results),
        _blessing_section(facts.results),
        _push_section(facts.results),
    ]
    title = f"{facts.pipeline_name}: run {facts.run_id}"
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{_text(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{_text(title)}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    path = os.path.join(folder, "index.html")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path


def _text(value):
    return html.escape(str(value))


def _note(value):
    return f"<p class='note'>{_text(value)}</p>"


def _image(name, alt):
    return f"<img src='{_text(name)}' alt='{_text(alt)}'>"


def _data_section(results):
    lines = [
        f"<li>{_text(summary.span_label(spans))}: {_text(summary.example_counts(counts))}</li>"
        for spans, counts in results.spans
    ]
    body = f"<ul>{''.join(lines)}</ul>" if lines else _note("no ingested data recorded")
    if results.skipped:
        skipped = "".join(f"<li>{_text(line)}</li>" for line in results.skipped)
        body += f"<p>Skipped {len(results.skipped)} bad input(s):</p><ul>{skipped}</ul>"
    return f"<h2>Data</h2>{body}"


def _pictures_section(facts, folder):
    parts = ["<h2>What the transformer does, per distortion</h2>", _note(facts.samples_note)]
    for index, sample in enumerate(facts.samples):
        stem = f"{index}-{folder_name(sample.variant)}"
        visualize.plot_rectification(
            sample.inputs,
            sample.rectified,
            os.path.join(folder, f"rectified-{stem}.png"),
            labels=sample.labels,
        )
        parts.append(f"<h3>variant {_text(sample.variant)}</h3>")
        parts.append(_image(f"rectified-{stem}.png", f"{sample.variant}: inputs and rectified"))
        if sample.grids is not None:
            visualize.plot_sampling_grids(
                sample.inputs, sample.grids, os.path.join(folder, f"grid-{stem}.png")
            )
            parts.append(_image(f"grid-{stem}.png", f"{sample.variant}: sampling grids"))
    parts.append(_note(facts.grid_note))
    return "\n".join(parts)


def _curves_section(facts, folder):
    parts = ["<h2>Training</h2>", _note(facts.history_note)]
    if facts.history:
        visualize.plot_training_curves(
            {"model": facts.history}, os.path.join(folder, "training-curves.png")
        )
        parts.append(_image("training-curves.png", "training curves"))
    return "\n".join(parts)


def _metrics_section(results, folder):
    parts = ["<h2>Evaluation per slice (sparse categorical accuracy)</h2>"]
    if not results.metrics:
        return "\n".join([*parts, _note("the Evaluator did not run: no metrics")])
    with_baseline = any("baseline" in row for row in results.metrics.values())
    header = "<tr><th>slice</th><th>examples</th><th>accuracy</th>"
    header += "<th>baseline</th><th>change</th></tr>" if with_baseline else "</tr>"
    rows = [header]
    bars = {}
    for name, row in results.metrics.items():
        accuracy = row.get("candidate")
        cells = [_text(name), f"{row.get('examples', 0):,}", _number(accuracy)]
        if with_baseline:
            baseline = row.get("baseline")
            change = None if accuracy is None or baseline is None else accuracy - baseline
            cells += [_number(baseline), "&ndash;" if change is None else f"{change:+.4f}"]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
        values = {"accuracy": accuracy, "baseline accuracy": row.get("baseline")}
        values = {key: value for key, value in values.items() if value is not None}
        if values:
            bars[name] = values
    parts.append("<table>" + "".join(rows) + "</table>")
    if bars:
        visualize.plot_slice_metrics(bars, os.path.join(folder, "slice-metrics.png"))
        parts.append(_image("slice-metrics.png", "accuracy per slice"))
    return "\n".join(parts)


def _number(value):
    return "&ndash;" if value is None else f"{value:.4f}"


def _anomalies_section(results):
    if results.anomalies is None:
        return f"<h2>Anomalies</h2>{_note(summary.NOT_VALIDATED)}"
    if not results.anomalies:
        return "<h2>Anomalies</h2><p class='ok'>none</p>"
    items = "".join(f"<li>{_text(sentence)}</li>" for sentence in results.anomalies)
    return f"<h2>Anomalies</h2><p class='bad'>{len(results.anomalies)} found</p><ul>{items}</ul>"


def _blessing_section(results):
    verdict, style = {
        True: ("BLESSED", "ok"),
        False: ("NOT BLESSED", "bad"),
        None: ("not evaluated", "note"),
    }[results.blessed]
    reasons = "".join(f"<li>{_text(reason)}</li>" for reason in results.why)
    overall = results.metrics.get("Overall", {})
    if "baseline" in overall:
        baseline = (
            f"<p>overall accuracy {_number(overall.get('candidate'))} against the baseline's "
            f"{_number(overall['baseline'])}</p>"
        )
    elif results.blessed is None:  # not evaluated: whether a baseline exists is not known
        baseline = ""
    else:
        baseline = _note("no baseline: no model approved (blessed and checked) before this one")
    return f"<h2>Blessing</h2><p class='{style}'>{verdict}</p><ul>{reasons}</ul>{baseline}"


def _push_section(results):
    if results.pushed_to:
        return f"<h2>Push</h2><p class='ok'>pushed to <code>{_text(results.pushed_to)}</code></p>"
    return f"<h2>Push</h2><p class='bad'>{_text(results.push_note)}</p>"
