"""Uploads a compiled pipeline to Kubeflow Pipelines and keeps one recurring run of it.

    schedule(kfp.Client(host=URL), "stn.yaml", "stn-pipeline", "0 0 3 * * *", "stn")

With the kfp 2.x `Client` (KFP API v2beta1): the package becomes a new pipeline, or a new
version of the pipeline of that name; the recurring run named after the pipeline (in the
experiment, created if missing) is created on that version, and any older recurring run of the
same name is deleted afterwards, so exactly one remains and there is never none. A `namespace`
(a profile's, on multi-user KFP) holds the pipeline and the experiment, and so the recurring
run; without one the pipeline is shared and the experiment is in the client's namespace.
"""

import dataclasses
import datetime
import hashlib
import json
import os
import re

PACKAGE_SUFFIXES = (".yaml", ".yml", ".zip", ".tar.gz")  # what the kfp 2.x Client uploads


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """What `schedule` did."""

    pipeline_id: str
    version_id: str
    new_pipeline: bool
    experiment_id: str
    recurring_run_id: str
    cron: str
    replaced: tuple  # ids of the recurring runs of the same name that were deleted


_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_WEEKDAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
# KFP's cron fields (robfig/cron with seconds): name, smallest and largest value, value names.
_CRON_FIELDS = (
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {name: number for number, name in enumerate(_MONTHS, 1)}),
    ("weekday", 0, 6, {name: number for number, name in enumerate(_WEEKDAYS)}),
)
_CRON_PART = re.compile(r"(?:[*?]|(\w+)(?:-(\w+))?)(?:/([0-9]+))?", re.ASCII)


def kfp_cron(expression):
    """KFP's 6-field cron (seconds first); a 5-field Unix cron gets second 0 prepended.

    Raises ValueError naming the field that KFP's parser would refuse (a 7 for Sunday too).
    """
    fields = str(expression).split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(
            f"--cron {expression!r} must have 5 fields (minute hour day month weekday) "
            "or 6 (KFP's: second first)"
        )
    for text, field in zip(fields, _CRON_FIELDS, strict=True):
        for part in text.split(","):
            problem = _cron_part_problem(part, *field)
            if problem:
                raise ValueError(f"--cron {expression!r}: {field[0]} {part!r} {problem}")
    return " ".join(fields)


def _cron_part_problem(part, name, low, high, names):
    """What is wrong with one comma-separated part of a cron field, or None."""
    match = _CRON_PART.fullmatch(part)
    if not match:
        return "is not *, a value, a range a-b or either with /step"
    first, last, step = match.groups()
    values = []
    for text in filter(None, (first, last)):
        value = int(text) if text.isdigit() else names.get(text.upper())
        if value is None:
            allowed = f"a number or one of {', '.join(names)}" if names else "a number"
            return f"holds {text!r}, not {allowed}"
        if not low <= value <= high:
            sunday = " (Sunday is 0)" if name == "weekday" and value == 7 else ""
            return f"holds {value}, outside {low}-{high}{sunday}"
        values.append(value)
    if values != sorted(values):
        return "is a range that runs backwards"
    if step is not None and int(step) == 0:
        return "has a step of 0"
    return None


def _name_filter(name):
    predicate = {"operation": "EQUALS", "key": "display_name", "stringValue": name}
    return json.dumps({"predicates": [predicate]})


def _version_name(package_path):
    with open(package_path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:8]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S-%f")
    return f"v{stamp}-{digest}"


def check_package(package_path):
    """Raise ValueError unless `package_path` is a file the kfp Client uploads."""
    if not str(package_path).endswith(PACKAGE_SUFFIXES):
        raise ValueError(f"pipeline package {package_path} must end in one of {PACKAGE_SUFFIXES}")
    if not os.path.isfile(package_path):
        raise ValueError(f"pipeline package {package_path} is not a file")


def find_pipeline(client, name, namespace=None):
    """The id of the pipeline called `name` (in `namespace`, else the shared ones), or None."""
    found = client.list_pipelines(filter=_name_filter(name), namespace=namespace).pipelines or []
    if len(found) > 1:
        raise ValueError(f"Kubeflow holds {len(found)} pipelines named {name}: rename or delete")
    return found[0].pipeline_id if found else None


def upload(client, package_path, pipeline_name, namespace=None):
    """(pipeline id, version id, new?): the package as a new pipeline or a new version."""
    check_package(package_path)
    pipeline_id = find_pipeline(client, pipeline_name, namespace)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(
            package_path, pipeline_name=pipeline_name, namespace=namespace
        )
        if not pipeline.pipeline_id:  # an answer that is not KFP's JSON, e.g. a login page
            raise RuntimeError(
                f"the host answered the upload of {pipeline_name} without a pipeline id: --host "
                "must be the KFP API server (e.g. http://ml-pipeline.kubeflow:8888)"
            )
        versions = client.list_pipeline_versions(
            pipeline.pipeline_id, page_size=1, sort_by="created_at desc"
        ).pipeline_versions
        if not versions:
            raise RuntimeError(f"Kubeflow made pipeline {pipeline_name} but no version of it")
        return pipeline.pipeline_id, versions[0].pipeline_version_id, True
    version = client.upload_pipeline_version(
        package_path, _version_name(package_path), pipeline_id=pipeline_id
    )
    return pipeline_id, version.pipeline_version_id, False


def recurring_runs_named(client, experiment_id, name):
    """Ids of the recurring runs called `name` in the experiment (all pages)."""
    ids, token = [], ""
    while True:
        page = client.list_recurring_runs(
            page_token=token, page_size=100, experiment_id=experiment_id, filter=_name_filter(name)
        )
        runs = page.recurring_runs or []
        ids += [run.recurring_run_id for run in runs if run.display_name == name]
        token = page.next_page_token
        if not token:
            return ids


def schedule(client, package_path, pipeline_name, cron, experiment, job_name=None, namespace=None):
    """Upload `package_path` and make it the one recurring run `job_name` (default: the name)."""
    cron = kfp_cron(cron)
    job_name = job_name or pipeline_name
    pipeline_id, version_id, new = upload(client, package_path, pipeline_name, namespace)
    # Gets it if it exists; the recurring run is in the experiment's namespace.
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    older = recurring_runs_named(client, experiment_id, job_name)
    created = client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=job_name,
        description=f"{pipeline_name} on cron {cron!r}",
        cron_expression=cron,
        pipeline_id=pipeline_id,
        version_id=version_id,
        max_concurrency=1,
        no_catchup=True,
        enabled=True,
    )
    for run_id in older:
        client.delete_recurring_run(run_id)
    return Scheduled(
        pipeline_id=pipeline_id,
        version_id=version_id,
        new_pipeline=new,
        experiment_id=experiment_id,
        recurring_run_id=created.recurring_run_id,
        cron=cron,
        replaced=tuple(older),
    )
