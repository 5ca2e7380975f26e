"""`stn-pipeline compile --kubeflow` and `schedule`, against KFP's protos and a loopback API.

No Kubeflow runs here: `KFPServer` is a stdlib HTTP server that answers the KFP v2beta1 REST
calls the kfp 2.13 `Client` makes (healthz, pipelines, upload, upload_version, experiments,
recurring runs) the way the KFP API server does, and records every request.
"""

import argparse
import email.parser
import http.server
import itertools
import json
import pathlib
import socket
import subprocess
import sys
import threading
import urllib.parse

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from pipeline import cli, compile_cmd, kfp_step
from pipeline.configs import PipelineConfig, load_config

IMAGE = "registry.example/stn-pipeline:9.9"
PIPELINE_ROOT = "gs://bucket/stn"


def _parse_package(path):
    with open(path) as handle:
        document = yaml.safe_load(handle)
    return json_format.ParseDict(document, pipeline_spec_pb2.PipelineSpec())


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    path = tmp_path_factory.mktemp("kfp") / "stn.yaml"
    argv = ["compile", "--kubeflow", str(path), "--target", "vertex", "--image", IMAGE]
    assert cli.main([*argv, "--pipeline-root", PIPELINE_ROOT]) == 0
    return path


def test_compiled_package_parses_as_a_pipeline_spec_with_every_component(package):
    from pipeline.local_runner import component_ids
    from pipeline.pipeline import create_pipeline

    spec = _parse_package(package)
    tasks = set(spec.root.dag.tasks)
    local_ids = component_ids(create_pipeline(load_config(home="/stn/home")))
    assert len(local_ids) == 11
    for component_id in local_ids:
        # KFP splits a TFX Resolver into one resolver task per output channel.
        matching = {
            task for task in tasks if task == component_id or task.startswith(component_id + "-")
        }
        assert matching, f"{component_id} is missing from the compiled tasks {sorted(tasks)}"
    assert {task for task in tasks if task.startswith("latest_blessed_model_resolver-")} == {
        "latest_blessed_model_resolver-model-resolver",
        "latest_blessed_model_resolver-model-blessing-resolver",
    }
    assert len(tasks) == len(local_ids) + 1
    assert spec.pipeline_info.name == "stn-pipeline"
    assert spec.default_pipeline_root == PIPELINE_ROOT


# --- --target kubeflow (the default): one step, `watch --once`, for the open-source backend ---

K8S_BASE = pathlib.Path(__file__).resolve().parents[1] / "k8s" / "base"


@pytest.fixture(scope="module")
def watch_package(tmp_path_factory):
    path = tmp_path_factory.mktemp("kfp") / "stn-watch.yaml"
    assert cli.main(["compile", "--kubeflow", str(path), "--image", IMAGE]) == 0
    return path


def _watch_documents(path):
    """(PipelineSpec, KubernetesExecutorConfig of its one executor) parsed by KFP's protos."""
    from kfp.kubernetes import kubernetes_executor_config_pb2

    spec, platforms = yaml.safe_load_all(path.read_text())
    ((name, executor),) = platforms["platforms"]["kubernetes"]["deploymentSpec"][
        "executors"
    ].items()
    assert name == "exec-retrain"
    config = kubernetes_executor_config_pb2.KubernetesExecutorConfig()
    return json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec()), json_format.ParseDict(
        executor, config
    )


def _cronjob():
    """(the CronJob's Job spec, its one container, its claims by volume name)."""
    job = yaml.safe_load((K8S_BASE / "retrain-cronjob.yaml").read_text())["spec"]["jobTemplate"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    return job["spec"], container, claims


def test_the_kubeflow_target_is_one_uncached_step_that_runs_watch_once(watch_package):
    spec, _ = _watch_documents(watch_package)
    assert list(spec.root.dag.tasks) == ["retrain"]
    task = spec.root.dag.tasks["retrain"]
    assert not task.caching_options.enable_cache  # a cached step would never see a new span
    container = spec.deployment_spec["executors"]["exec-retrain"]["container"]
    assert container["image"] == IMAGE
    assert list(container["command"]) == ["python", "-m", "pipeline.kfp_step"]
    assert list(container["args"]) == ["{{$.inputs.parameters['config_yaml']}}"]
    assert spec.pipeline_info.name == "stn-pipeline"


def test_the_kubeflow_step_has_the_cronjobs_volumes_resources_and_pod_fields(watch_package):
    spec, kubernetes = _watch_documents(watch_package)
    job, container, claims = _cronjob()
    mounts = {
        m.pvc_name_parameter.runtime_value.constant.string_value: m.mount_path
        for m in kubernetes.pvc_mount
    }
    cronjob_mounts = {
        claims[m["name"]]: m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims
    }
    assert (
        mounts
        == cronjob_mounts
        == {"stn-pipeline-root": "/stn/home", "stn-models": "/stn/home/serving"}
    )
    storage = {
        doc["metadata"]["name"]
        for doc in yaml.safe_load_all((K8S_BASE / "storage.yaml").read_text())
        if doc["kind"] == "PersistentVolumeClaim"
    }
    assert set(mounts) <= storage
    assert kubernetes.active_deadline_seconds == job["activeDeadlineSeconds"]
    fields = {env.name: env.field_path for env in kubernetes.field_path_as_env}
    assert fields == {
        env["name"]: env["valueFrom"]["fieldRef"]["fieldPath"] for env in container["env"]
    }
    resources = spec.deployment_spec["executors"]["exec-retrain"]["container"]["resources"]
    assert resources["resourceCpuRequest"] == container["resources"]["requests"]["cpu"]
    assert resources["resourceCpuLimit"] == container["resources"]["limits"]["cpu"]
    assert resources["resourceMemoryRequest"] == container["resources"]["requests"]["memory"]
    assert resources["resourceMemoryLimit"] == container["resources"]["limits"]["memory"]


def _default_config_yaml(path):
    spec, _ = _watch_documents(path)
    return spec.root.input_definitions.parameters["config_yaml"].default_value.string_value


def test_the_kubeflow_steps_config_is_the_compiled_one_and_mounts_follow_the_home(tmp_path):
    values = yaml.safe_load((K8S_BASE / "pipeline.yaml").read_text())  # multiworker settings
    values.update(home="/mnt/stn", epochs=3, span_window=2, beam_args=["--foo=1"])
    values["multiworker"]["kubernetes"]["mount_path"] = "/mnt/stn"
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(values))
    path = tmp_path / "stn.yaml"
    assert cli.main(["compile", "--kubeflow", str(path), "--config", str(config_file)]) == 0
    carried = tmp_path / "carried.yaml"
    carried.write_text(_default_config_yaml(path))
    assert load_config(str(carried)) == load_config(
        str(config_file), defaults={"home": "/stn/home"}
    )
    spec, kubernetes = _watch_documents(path)
    assert sorted(m.mount_path for m in kubernetes.pvc_mount) == ["/mnt/stn", "/mnt/stn/serving"]
    container = spec.deployment_spec["executors"]["exec-retrain"]["container"]
    assert [dict(env) for env in container["env"]] == [
        {"name": kfp_step.HOME_ENV, "value": "/mnt/stn"}
    ]


def test_the_kubeflow_step_refuses_a_home_its_package_does_not_mount(
    watch_package, tmp_path, monkeypatch, capsys
):
    spec, _ = _watch_documents(watch_package)
    (env,) = spec.deployment_spec["executors"]["exec-retrain"]["container"]["env"]
    monkeypatch.setenv(env["name"], env["value"])
    values = yaml.safe_load(_default_config_yaml(watch_package))
    (tmp_path / "data").mkdir()
    values.update(home="/stn/home/other", data_root=str(tmp_path / "data"))  # changed in the UI
    assert kfp_step.main([yaml.safe_dump(values)]) == 2
    assert (
        "config field 'home' must be /stn/home, where the package mounts the claims "
        "'stn-pipeline-root' and 'stn-models'; got '/stn/home/other'" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("home", "claim", "mount_path"),
    [("/mnt/stn", "stn-pipeline-root", "/stn/home"), ("/stn/home", "stn-data", "/stn/home")],
    ids=["another home", "another claim"],
)
def test_kubernetes_workers_must_see_the_steps_home(tmp_path, capsys, home, claim, mount_path):
    values = yaml.safe_load((K8S_BASE / "pipeline.yaml").read_text())
    values["home"] = home
    values["multiworker"]["kubernetes"].update(pvc=claim, mount_path=mount_path)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(values))
    path = tmp_path / "stn.yaml"
    assert cli.main(["compile", "--kubeflow", str(path), "--config", str(config_file)]) == 2
    assert f"mount {claim!r} at {mount_path}" in capsys.readouterr().err
    assert not path.exists()
    assert kfp_step.main([yaml.safe_dump(values)]) == 2
    assert (
        "the Kubernetes workers must mount the claim 'stn-pipeline-root'" in capsys.readouterr().err
    )


def test_the_carried_config_survives_floats_escapes_and_characters_beyond_ascii(tmp_path):
    from pipeline.kubeflow_watch import config_text

    config = PipelineConfig(
        home="/mnt/stn \U0001f600\n\u2028 'quoted' \"too\" # not a comment",
        learning_rate=1e-5,
        regression_tolerance=1e-6,
        equivariance_weight=1e20,
        beam_args=("--job_name=a b", "--x='y'"),
        model_name="1e5",  # a string a config file reads as a number unless it is quoted
    )
    text = config_text(config)
    assert "\n" not in text and text.isascii()
    assert PipelineConfig(**yaml.safe_load(text)) == config
    config_file = tmp_path / "carried.yaml"
    config_file.write_text(text)
    assert load_config(str(config_file)) == config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("home: stn", "config field 'home' must be an absolute path in the step's pod"),
        ("home: gs://bucket/stn", "config field 'home' must be an absolute path"),
        ("data_root: data", "config field 'data_root' must be an absolute path"),
        ("pipeline_name: STN", "config field 'pipeline_name' must be 1 to 128 lowercase"),
        ("pipeline_name: stn_pipeline", "config field 'pipeline_name' must be 1 to 128"),
        (f"pipeline_name: {'a' * 129}", "config field 'pipeline_name' must be 1 to 128"),
    ],
)
def test_the_kubeflow_target_refuses_what_its_pod_could_not_run(tmp_path, fields, message, capsys):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(fields + "\n")
    path = tmp_path / "stn.yaml"
    assert cli.main(["compile", "--kubeflow", str(path), "--config", str(config_file)]) == 2
    assert message in capsys.readouterr().err
    assert not path.exists()


def test_the_kubeflow_step_polls_the_carried_configs_data_root(watch_package, tmp_path, capsys):

    values = yaml.safe_load(_default_config_yaml(watch_package))
    values["home"] = str(tmp_path / "home")
    (tmp_path / "data").mkdir()
    values["data_root"] = str(tmp_path / "data")
    assert kfp_step.main([yaml.safe_dump(values)]) == 0
    out = capsys.readouterr().out
    assert f"watching {tmp_path / 'data'} for new spans (home {tmp_path / 'home'})" in out
    assert f"no new span under {tmp_path / 'data'} (no span trained yet)" in out


@pytest.mark.slow
def test_the_kubeflow_step_run_as_its_pod_runs_it_trains_and_pushes_once(tmp_path):
    from pipeline import spans
    from pipeline.summary import served_versions

    home, data = tmp_path / "home", tmp_path / "data"
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(
        f"home: {home}\ndata_root: {data}\ntrain_steps: 2\nbatch_size: 16\naccuracy_floor: 0.0\n"
    )
    path = tmp_path / "stn.yaml"
    assert cli.main(["compile", "--kubeflow", str(path), "--config", str(config_file)]) == 0
    spans.write_span(data, span=1, per_class=3, copies=1)
    spec, _ = _watch_documents(path)
    container = spec.deployment_spec["executors"]["exec-retrain"]["container"]
    command = [sys.executable, *list(container["command"])[1:], _default_config_yaml(path)]

    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "finished: blessed, pushed to" in first.stdout
    assert len(served_versions(home / "serving" / "stn")) == 1
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"no new span under {data} (trained up to span 1)" in again.stdout


@pytest.mark.parametrize(
    ("config_yaml", "message"),
    [
        ("epochs: 0\n", "config field 'epochs' must be >= 1, got 0"),
        ("[1, 2]\n", "must hold a mapping of field names to values"),
        ("home: /nonexistent/stn\n", "the data root /nonexistent/stn/data does not exist"),
        ("{}", "the data root /stn/home/data does not exist"),  # compile's default home
        ("home: stn\n", "config field 'home' must be an absolute path in the step's pod"),
        ("a: [\n", "kfp step: config_yaml is not valid YAML"),  # named as the user knows it
    ],
)
def test_the_kubeflow_step_names_what_is_wrong_with_its_config(config_yaml, message, capsys):
    assert kfp_step.main([config_yaml]) == 2
    assert message in capsys.readouterr().err


def test_pipeline_root_is_refused_for_the_kubeflow_target(tmp_path, capsys):
    path = tmp_path / "stn.yaml"
    assert cli.main(["compile", "--kubeflow", str(path), "--pipeline-root", PIPELINE_ROOT]) == 2
    assert "--pipeline-root is for --target vertex" in capsys.readouterr().err
    assert not path.exists()


# --- --target vertex: one step per TFX component (KubeflowV2DagRunner) ------------------------


def test_image_and_pipeline_root_come_from_the_config_file(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"container_image: {IMAGE}\nkubeflow_pipeline_root: {PIPELINE_ROOT}\n")
    path = tmp_path / "stn.yaml"
    argv = ["compile", "--kubeflow", str(path), "--target", "vertex", "--config", str(config_file)]
    assert cli.main(argv) == 0
    spec = _parse_package(path)
    assert spec.default_pipeline_root == PIPELINE_ROOT
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    images = {e["container"]["image"] for e in executors.values() if "container" in e}
    assert images == {IMAGE}


def test_compiled_steps_run_the_tfx_executor_in_the_configured_image(package):
    spec = _parse_package(package)
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    containers = [
        executor["container"] for executor in executors.values() if "container" in executor
    ]
    assert len(containers) == 10  # every component but the resolver (its two tasks run none)
    for container in containers:
        assert container["image"] == IMAGE
        assert container["command"] == [
            "python",
            "-m",
            "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor",
        ]


def _constant(package, task, name):
    """The string constant that the compiled `task` gets as its parameter `name`."""
    tasks = json_format.MessageToDict(_parse_package(package).root)["dag"]["tasks"]
    parameter = tasks[task]["inputs"]["parameters"][name]
    return parameter["runtimeValue"]["constantValue"]["stringValue"]


def test_compiled_paths_are_the_cluster_home(package):
    assert _constant(package, "ImageExampleGen", "input_base") == "/stn/home/data"
    destination = json.loads(_constant(package, "Pusher", "push_destination"))
    assert destination == {"filesystem": {"base_directory": "/stn/home/serving/stn"}}


def test_the_compiled_schema_import_needs_no_file_of_the_compiling_machine(package, tmp_path):
    from tfx.types import standard_artifacts
    from tfx.utils import import_utils

    from pipeline.validation import SCHEMA_FILE

    spec = _parse_package(package)
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    args = executors["ImportSchemaGen_executor"]["container"]["args"]
    executor = import_utils.import_class_by_path(args[args.index("--executor_class_path") + 1])
    parameters = json_format.MessageToDict(spec.root)["dag"]["tasks"]["ImportSchemaGen"]
    exec_properties = {
        name: _constant(package, "ImportSchemaGen", name)
        for name in parameters["inputs"]["parameters"]
    }
    # The step runs in the image, where the compiling checkout's schema file does not exist.
    assert exec_properties["schema_file"] == str(SCHEMA_FILE)
    exec_properties["schema_file"] = str(tmp_path / "absent" / "schema.pbtxt")
    schema = standard_artifacts.Schema()
    schema.uri = str(tmp_path / "schema")
    executor().Do({}, {"schema": [schema]}, exec_properties)
    assert (tmp_path / "schema" / "schema.pbtxt").read_text() == SCHEMA_FILE.read_text()


def test_the_config_files_home_is_kept_and_home_overrides_it(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("home: /mnt/stn\n")
    path = tmp_path / "stn.yaml"
    argv = ["compile", "--kubeflow", str(path), "--target", "vertex", "--config", str(config_file)]
    assert cli.main(argv) == 0
    assert _constant(path, "ImageExampleGen", "input_base") == "/mnt/stn/data"
    assert cli.main([*argv, "--home", "/srv/stn"]) == 0
    assert _constant(path, "ImageExampleGen", "input_base") == "/srv/stn/data"


@pytest.mark.parametrize(
    ("flag", "field"),
    [
        ("--home", "home"),
        ("--data-root", "data_root"),
        ("--pipeline-root", "kubeflow_pipeline_root"),
    ],
)
def test_the_vertex_target_refuses_a_relative_path(tmp_path, monkeypatch, capsys, flag, field):
    # A relative path would be made absolute here: a folder of this machine, not of the pods.
    monkeypatch.chdir(tmp_path)
    argv = ["compile", "--kubeflow", "stn.yaml", "--target", "vertex", flag, "stn"]
    assert cli.main(argv) == 2
    assert f"config field {field!r} must be an absolute path or a URI" in capsys.readouterr().err
    assert not (tmp_path / "stn.yaml").exists()


def test_a_span_window_compiles_into_the_example_gen_without_a_resolver(tmp_path, package):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("span_window: 3\n")
    path = tmp_path / "stn.yaml"
    argv = ["compile", "--kubeflow", str(path), "--target", "vertex", "--config", str(config_file)]
    assert cli.main(argv) == 0
    tasks = json_format.MessageToDict(_parse_package(path).root)["dag"]["tasks"]
    assert sorted(task for task in tasks if "resolver" in task) == [
        "latest_blessed_model_resolver-model-blessing-resolver",
        "latest_blessed_model_resolver-model-resolver",
    ]
    # TFX's own driver would fingerprint span 3 only (and weakly), so ingest is never cached.
    assert tasks["ImageExampleGen"]["cachingOptions"] == {}  # enableCache: false
    assert tasks["StatisticsGen"]["cachingOptions"] == {"enableCache": True}
    one_span = json_format.MessageToDict(_parse_package(package).root)["dag"]["tasks"]
    assert one_span["ImageExampleGen"]["cachingOptions"] == {}
    custom_config = tasks["ImageExampleGen"]["inputs"]["parameters"]["custom_config"]
    settings = json.loads(custom_config["runtimeValue"]["constantValue"]["stringValue"])
    assert settings["custom_config"]["value"]["span_window"] == 3


def test_compile_refuses_a_package_name_kfp_cannot_upload(tmp_path, capsys):
    target = tmp_path / "stn.json"
    assert cli.main(["compile", "--kubeflow", str(target)]) == 2
    assert "must end in .yaml or .yml" in capsys.readouterr().err
    assert not target.exists()


# --- a KFP API server on loopback ------------------------------------------------------------


class KFPServer:
    """The KFP v2beta1 REST API's pipeline, experiment and recurring-run calls, in memory."""

    def __init__(self, multi_user=False):
        self.multi_user = multi_user  # profiles: experiments need a namespace, as KFP's do
        self.calls = []  # (method, path, query {name: value}, body bytes)
        self.pipelines = {}  # id -> {"display_name", "namespace", "versions": [version dicts]}
        self.experiments = {}  # id -> experiment dict
        self.recurring_runs = {}  # id -> recurring run dict (as created)
        self.uploads = {}  # version id -> uploaded package bytes
        self._ids = itertools.count(1)
        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._http.shutdown()
        self._http.server_close()

    def _new_id(self, kind):
        return f"{kind}-{next(self._ids)}"

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _dispatch(self, method):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.calls.append((method, url.path, query, body))
                try:
                    status, answer = server.answer(method, url.path, query, body, self.headers)
                except ValueError as error:  # what the API server calls InvalidArgument
                    status, answer = 400, {"error": str(error), "code": 3}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

            def do_DELETE(self):
                self._dispatch("DELETE")

        return Handler

    def answer(self, method, path, query, body, headers):
        prefix = "/apis/v2beta1/"
        if not path.startswith(prefix):
            return 404, {"error": f"no such path {path}", "code": 5}
        route = path[len(prefix) :]
        if (method, route) == ("GET", "healthz"):
            return 200, {"multi_user": self.multi_user}
        if (method, route) == ("GET", "pipelines"):
            found = [
                self._pipeline(i)
                for i, pipeline in self.pipelines.items()
                if self._matches(query, pipeline)
                and pipeline["namespace"] == self._namespace(query.get("namespace"))
            ]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if (method, route) == ("POST", "pipelines/upload"):
            return self._upload(query, body, headers)
        if (method, route) == ("POST", "pipelines/upload_version"):
            return self._upload_version(query, body, headers)
        if method == "GET" and route.startswith("pipelines/") and route.endswith("/versions"):
            versions = self.pipelines[route.split("/")[1]]["versions"]
            if query.get("sort_by") == "created_at desc":
                versions = versions[::-1]
            versions = versions[: int(query.get("page_size", 10))]
            return 200, {"pipeline_versions": versions, "total_size": len(versions)}
        if (method, route) == ("GET", "experiments"):
            namespace = self._experiment_namespace(query.get("namespace"))
            found = [
                e
                for e in self.experiments.values()
                if self._matches(query, e) and e["namespace"] == namespace
            ]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if (method, route) == ("POST", "experiments"):
            experiment = json.loads(body)
            experiment["namespace"] = self._experiment_namespace(experiment.get("namespace"))
            experiment["experiment_id"] = self._new_id("experiment")
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if (method, route) == ("POST", "recurringruns"):
            run = json.loads(body)
            run.update(recurring_run_id=self._new_id("recurring-run"), status="ENABLED")
            self.recurring_runs[run["recurring_run_id"]] = run
            return 200, run
        if (method, route) == ("GET", "recurringruns"):
            found = [
                run
                for run in self.recurring_runs.values()
                if run["experiment_id"] == query.get("experiment_id", run["experiment_id"])
                and self._matches(query, run)
            ]
            # The API's JSON names this list in camelCase (kfp_server_api's attribute map).
            return 200, {"recurringRuns": found, "total_size": len(found)} if found else {}
        if method == "DELETE" and route.startswith("recurringruns/"):
            if self.recurring_runs.pop(route.split("/")[1], None) is None:
                return 404, {"error": "recurring run not found", "code": 5}
            return 200, {}
        return 404, {"error": f"{method} {path} is not served here", "code": 12}

    def _namespace(self, namespace):
        """The namespace that KFP stores: as given with profiles, none in single-user mode."""
        return (namespace or "") if self.multi_user else ""

    def _experiment_namespace(self, namespace):
        if self.multi_user and not namespace:
            raise ValueError("An experiment cannot have an empty namespace in multi-user mode")
        return self._namespace(namespace)

    @staticmethod
    def _matches(query, item):
        predicates = json.loads(query["filter"])["predicates"] if "filter" in query else []
        for predicate in predicates:
            # JSON protobuf enums come as a name or a number (Predicate.Operation EQUALS = 1).
            if predicate["operation"] not in ("EQUALS", 1):
                raise ValueError(f"only EQUALS filters are served here: {predicate}")
            if item.get(predicate["key"]) != predicate["stringValue"]:
                return False
        return True

    def _pipeline(self, pipeline_id):
        pipeline = self.pipelines[pipeline_id]
        return {
            "pipeline_id": pipeline_id,
            "display_name": pipeline["display_name"],
            "namespace": pipeline["namespace"],
        }

    @staticmethod
    def _uploaded_file(body, headers):
        message = email.parser.BytesParser().parsebytes(
            f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body
        )
        parts = [
            part
            for part in message.get_payload()
            if part.get_param("name", header="content-disposition") == "uploadfile"
        ]
        if len(parts) != 1:
            raise ValueError("an upload must carry exactly one `uploadfile` part")
        return parts[0].get_payload(decode=True)

    def _add_version(self, pipeline_id, name, package):
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": self._new_id("version"),
            "display_name": name,
            "created_at": f"2026-01-01T00:00:{len(self.uploads):02d}Z",
        }
        self.pipelines[pipeline_id]["versions"].append(version)
        self.uploads[version["pipeline_version_id"]] = package
        return version

    def _upload(self, query, body, headers):
        name = query["name"]
        namespace = self._namespace(query.get("namespace"))
        if any(
            (p["display_name"], p["namespace"]) == (name, namespace)
            for p in self.pipelines.values()
        ):
            return 409, {"error": f"pipeline {name} already exists", "code": 6}
        pipeline_id = self._new_id("pipeline")
        self.pipelines[pipeline_id] = {"display_name": name, "namespace": namespace, "versions": []}
        self._add_version(pipeline_id, name, self._uploaded_file(body, headers))
        return 200, self._pipeline(pipeline_id)

    def _upload_version(self, query, body, headers):
        pipeline = self.pipelines.get(query.get("pipelineid"))
        if pipeline is None:
            return 404, {"error": "pipeline not found", "code": 5}
        if any(v["display_name"] == query["name"] for v in pipeline["versions"]):
            return 409, {"error": f"version {query['name']} already exists", "code": 6}
        return 200, self._add_version(
            query["pipelineid"], query["name"], self._uploaded_file(body, headers)
        )


@pytest.fixture
def kfp_context(tmp_path, monkeypatch):
    """kfp's context file, in an empty home: not the user's ~/.config/kfp/context.json."""
    import kfp

    path = tmp_path / ".config" / "kfp" / "context.json"
    # kfp expanded ~ when it was imported, so setting HOME now would not reach it.
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(path))
    return path


@pytest.fixture
def kfp_server(kfp_context):
    with KFPServer() as server:
        yield server


def _schedule(server, package, *extra):
    argv = ["schedule", "--host", server.url, "--package", str(package), *extra]
    return cli.main(argv)


def test_first_schedule_uploads_the_package_and_creates_one_recurring_run(kfp_server, package):
    assert _schedule(kfp_server, package, "--cron", "0 3 * * *", "--experiment", "nightly") == 0

    ((pipeline_id, pipeline),) = kfp_server.pipelines.items()
    assert pipeline["display_name"] == "stn-pipeline"
    (version,) = pipeline["versions"]
    assert kfp_server.uploads[version["pipeline_version_id"]] == package.read_bytes()
    (experiment,) = kfp_server.experiments.values()
    assert experiment["display_name"] == "nightly"
    (run,) = kfp_server.recurring_runs.values()
    assert run["display_name"] == "stn-pipeline"
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}  # KFP's seconds field
    assert run["mode"] == "ENABLE"
    assert run["pipeline_version_reference"] == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version["pipeline_version_id"],
    }
    paths = [(method, path) for method, path, _, _ in kfp_server.calls]
    assert ("GET", "/apis/v2beta1/healthz") in paths
    assert ("POST", "/apis/v2beta1/pipelines/upload") in paths


def test_second_schedule_adds_a_version_and_replaces_the_recurring_run(kfp_server, package):
    assert _schedule(kfp_server, package, "--cron", "0 3 * * *") == 0
    (first_run_id,) = kfp_server.recurring_runs
    # Somebody else's schedule in the same experiment must survive.
    other = {
        "display_name": "other",
        "experiment_id": kfp_server.recurring_runs[first_run_id]["experiment_id"],
    }
    kfp_server.recurring_runs["recurring-run-other"] = other

    assert _schedule(kfp_server, package, "--cron", "30 4 * * 1-5") == 0

    (pipeline,) = kfp_server.pipelines.values()
    assert len(pipeline["versions"]) == 2
    newest = pipeline["versions"][-1]
    assert kfp_server.uploads[newest["pipeline_version_id"]] == package.read_bytes()
    ours = [
        run for run in kfp_server.recurring_runs.values() if run["display_name"] == "stn-pipeline"
    ]
    assert len(ours) == 1
    assert first_run_id not in kfp_server.recurring_runs
    assert ours[0]["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * 1-5"
    assert (
        ours[0]["pipeline_version_reference"]["pipeline_version_id"]
        == newest["pipeline_version_id"]
    )
    assert "recurring-run-other" in kfp_server.recurring_runs
    assert len(kfp_server.experiments) == 1


def test_schedule_takes_the_namespace_of_kfps_context_file(kfp_context, package):
    kfp_context.parent.mkdir(parents=True)
    kfp_context.write_text(json.dumps({"namespace": "team-b"}))
    with KFPServer(multi_user=True) as server:
        assert _schedule(server, package, "--cron", "0 3 * * *") == 0
    (experiment,) = server.experiments.values()
    assert experiment["namespace"] == "team-b"
    (pipeline,) = server.pipelines.values()
    assert pipeline["namespace"] == ""  # kfp's default: a shared pipeline


def test_schedule_keeps_pipeline_experiment_and_run_in_the_namespace(kfp_context, package, capsys):
    with KFPServer(multi_user=True) as server:
        for cron in ("0 3 * * *", "0 4 * * *"):
            argv = ["--cron", cron, "--namespace", "team-a"]
            assert _schedule(server, package, *argv) == 0
    (pipeline,) = server.pipelines.values()
    assert pipeline["namespace"] == "team-a"
    assert len(pipeline["versions"]) == 2  # the second run found the namespace's pipeline
    (experiment,) = server.experiments.values()
    assert experiment["namespace"] == "team-a"
    (run,) = server.recurring_runs.values()
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * *"
    uploads = [query for _, path, query, _ in server.calls if path.endswith("/pipelines/upload")]
    assert [query["namespace"] for query in uploads] == ["team-a"]
    assert "in experiment stn (namespace team-a): cron" in capsys.readouterr().out


def test_schedule_without_a_namespace_on_multi_user_kfp_says_so(kfp_context, package, capsys):
    with KFPServer(multi_user=True) as server:
        assert _schedule(server, package, "--cron", "0 3 * * *") == 2
    assert "multi-user: --namespace must name the namespace" in capsys.readouterr().err
    assert server.pipelines == server.experiments == {}


def test_schedule_compiles_the_pipeline_when_no_package_is_given(kfp_server, watch_package):
    argv = ["schedule", "--host", kfp_server.url, "--cron", "0 0 3 * * *", "--image", IMAGE]
    assert cli.main([*argv, "--pipeline-name", "stn-nightly"]) == 0
    (pipeline,) = kfp_server.pipelines.values()
    assert pipeline["display_name"] == "stn-nightly"
    (uploaded,) = kfp_server.uploads.values()
    assert list(yaml.safe_load_all(uploaded)) == list(yaml.safe_load_all(watch_package.read_text()))


@pytest.mark.parametrize(
    ("cron", "words"),
    [
        ("0 3 * * 7", "weekday '7' holds 7, outside 0-6 (Sunday is 0)"),
        ("99 99 99 99 99", "minute '99' holds 99, outside 0-59"),
        ("0 0 3 32 * *", "day of month '32' holds 32, outside 1-31"),
        ("0 3 * JAN-FOO *", "month 'JAN-FOO' holds 'FOO', not a number or one of JAN, FEB"),
        ("0 3 * * 5-1", "weekday '5-1' is a range that runs backwards"),
        ("*/0 * * * *", "minute '*/0' has a step of 0"),
        ("0 3 * * 1;2", "weekday '1;2' is not *, a value, a range a-b or either with /step"),
        ("x 3 * * *", "minute 'x' holds 'x', not a number"),
    ],
)
def test_schedule_names_the_cron_field_kfp_would_refuse(kfp_server, package, cron, words, capsys):
    assert _schedule(kfp_server, package, "--cron", cron) == 2
    assert f"--cron {cron!r}: {words}" in capsys.readouterr().err
    assert kfp_server.recurring_runs == {}


def test_schedule_refuses_digits_that_are_not_ascii(capsys):
    from pipeline.kfp_schedule import kfp_cron

    for cron in ("\u00b2 3 * * *", "0 3 * * \u0663"):
        with pytest.raises(ValueError, match="is not \\*, a value"):
            kfp_cron(cron)


def test_two_uploads_in_one_second_get_two_version_names(package):
    from pipeline.kfp_schedule import _version_name

    assert _version_name(package) != _version_name(package)


@pytest.mark.parametrize("cron", ["*/15 * * * *", "0 3 * * mon-fri", "0 0 3 ? 1,6 *"])
def test_schedule_takes_ranges_steps_lists_and_names(cron):
    from pipeline.kfp_schedule import kfp_cron

    assert kfp_cron(cron).split()[-5:] == cron.split()[-5:]


@pytest.mark.parametrize("cron", ["0 3 * *", "daily", "0 0 0 3 * * *"])
def test_schedule_rejects_a_bad_cron_before_calling_kubeflow(kfp_server, package, cron, capsys):
    assert _schedule(kfp_server, package, "--cron", cron) == 2
    assert f"--cron {cron!r} must have 5 fields" in capsys.readouterr().err
    assert kfp_server.calls == []


@pytest.mark.parametrize(
    ("name", "message"), [("missing.yaml", "is not a file"), ("stn.json", "must end in one of")]
)
def test_schedule_rejects_a_package_it_cannot_upload_before_calling_kubeflow(
    kfp_server, tmp_path, name, message, capsys
):
    (tmp_path / "stn.json").write_text("{}")
    assert _schedule(kfp_server, tmp_path / name, "--cron", "0 3 * * *") == 2
    assert f"pipeline package {tmp_path / name} {message}" in capsys.readouterr().err
    assert kfp_server.calls == []


def _compile_options():
    """The options `add_compile_arguments` gives but --config (it names the pipeline)."""
    parser = argparse.ArgumentParser()
    compile_cmd.add_compile_arguments(parser)
    return [
        option
        for action in parser._actions
        for option in action.option_strings
        if option not in ("-h", "--help", "--config")
    ]


def test_schedule_refuses_compile_options_a_package_would_ignore(kfp_server, package, capsys):
    options = _compile_options()
    assert {"--home", "--image", "--target"} <= set(options)
    for option in options:
        value = "kubeflow" if option == "--target" else "x"
        assert _schedule(kfp_server, package, "--cron", "0 3 * * *", option, value) == 2
        assert f"{option} shape(s) a package as it is compiled" in capsys.readouterr().err
    assert kfp_server.calls == []


def test_schedule_says_when_the_host_cannot_be_reached(package, kfp_context, capsys):
    with socket.socket() as probe:  # a loopback port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["schedule", "--host", f"http://127.0.0.1:{port}", "--cron", "0 3 * * *"]
    assert cli.main([*argv, "--package", str(package)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("stn-pipeline schedule: ")
    assert f"port={port}" in error and "Connection refused" in error


def test_schedule_says_when_the_host_is_not_the_kfp_api(package, kfp_context, capsys):
    class Page(http.server.BaseHTTPRequestHandler):
        """Answers every request with an HTML page, as a dashboard's login page does."""

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = b"<html><body>Log in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_GET

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        argv = ["schedule", "--host", host, "--cron", "0 3 * * *", "--package", str(package)]
        assert cli.main(argv) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert "--host must be the KFP API server" in capsys.readouterr().err
