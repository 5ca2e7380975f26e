"""The `kubernetes` backend: the workers as an Indexed Job behind a headless Service.

Why a plain Indexed Job (batch/v1) and not a Kubeflow TFJob: it needs no operator on the
cluster. Pod `i` of an Indexed Job gets the hostname `<job>-<i>` and, with `subdomain` set to
a headless Service of the same name, the DNS name `<job>-<i>.<job>`; so every worker can be
given the whole cluster on its command line, and takes its own index from
`JOB_COMPLETION_INDEX`, which Kubernetes sets in Indexed Jobs.

Fault tolerance is Kubernetes' own: `restartPolicy: OnFailure` restarts a failed worker in
place (the survivors fail on the broken collective and restart too), `backoffLimit` caps the
restarts, and the Trainer module's BackupAndRestore checkpoint on the shared volume lets the
group resume. The pipeline root lives on a PersistentVolumeClaim mounted at the same path in
every worker, so the paths in the worker spec are valid there.
"""

import logging
import threading
import time

from kubernetes import client, watch
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from components.multiworker_config import MultiWorkerConfig
from components.worker_launcher import WorkerGroupError

log = logging.getLogger(__name__)

CONTAINER = "worker"
JOB_LABEL = "stn-pipeline/job"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def worker_hosts(name: str, num_workers: int, port: int) -> list[str]:
    """The workers' `host:port`, resolvable through the headless Service `name`."""
    return [f"{name}-{i}.{name}:{port}" for i in range(num_workers)]


def _metadata(name: str, namespace: str) -> dict:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/managed-by": "stn-pipeline", JOB_LABEL: name},
    }


def build_service(name: str, config: MultiWorkerConfig) -> dict:
    """The headless Service that gives each worker pod a stable DNS name."""
    k8s = config.kubernetes
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, k8s.namespace),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_LABEL: name},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "grpc", "port": k8s.port, "targetPort": k8s.port}],
        },
    }


def build_job(name: str, spec_path: str, config: MultiWorkerConfig) -> dict:
    """The Indexed Job of `config.num_workers` workers running `run_fn` from `spec_path`."""
    k8s = config.kubernetes
    hosts = ",".join(worker_hosts(name, config.num_workers, k8s.port))
    # Limits equal requests (Guaranteed QoS): a worker that is throttled or evicted stalls the
    # whole group on the next collective.
    requests = {key: value for key, value in (("cpu", k8s.cpu), ("memory", k8s.memory)) if value}
    limits = dict(requests)
    if k8s.gpus_per_worker:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(k8s.gpus_per_worker)
    resources = {key: value for key, value in (("requests", requests), ("limits", limits)) if value}
    container = {
        "name": CONTAINER,
        "image": k8s.image,
        "command": ["python", "-m", "components.multiworker_worker", spec_path],
        "args": ["--cluster", hosts],
        "env": [
            {"name": "TF_USE_LEGACY_KERAS", "value": "1"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "ports": [{"name": "grpc", "containerPort": k8s.port}],
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "pipeline-root", "mountPath": k8s.mount_path},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec = {
        "subdomain": name,
        "restartPolicy": "OnFailure",
        "automountServiceAccountToken": False,
        # The namespace enforces the "restricted" Pod Security profile (k8s/base).
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "pipeline-root", "persistentVolumeClaim": {"claimName": k8s.pvc}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
        ],
    }
    if k8s.node_selector:
        pod_spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in k8s.tolerations]
    if k8s.service_account:
        pod_spec["serviceAccountName"] = k8s.service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(name, k8s.namespace),
        "spec": {
            "completionMode": "Indexed",
            "completions": config.num_workers,
            "parallelism": config.num_workers,
            # One broken worker makes every worker fail on the collective: a group restart
            # costs num_workers container restarts.
            "backoffLimit": config.max_restarts * config.num_workers,
            "template": {"metadata": {"labels": {JOB_LABEL: name}}, "spec": pod_spec},
        },
    }


class _PodLogs:
    """Copies each worker pod's log into this process's log as `[worker-i] ...`."""

    def __init__(self, core: client.CoreV1Api, namespace: str, name: str):
        self.core, self.namespace, self.name = core, namespace, name
        self.seen: set[str] = set()
        self.threads: list[threading.Thread] = []

    def pods(self) -> list:
        return self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{JOB_LABEL}={self.name}"
        ).items

    def follow_started(self) -> None:
        """Starts following the pods whose container has started."""
        for pod in self.pods():
            if pod.metadata.name not in self.seen and pod.status.phase != "Pending":
                self._start(pod, follow=True)

    def finish(self) -> None:
        """Reads the pods never followed, then waits for the followers."""
        for pod in self.pods():
            if pod.metadata.name not in self.seen:
                self._start(pod, follow=False)
        for thread in self.threads:
            thread.join()

    def _start(self, pod, follow: bool) -> None:
        self.seen.add(pod.metadata.name)
        index = (pod.metadata.annotations or {}).get(INDEX_ANNOTATION, "?")
        thread = threading.Thread(
            target=self._copy, args=(pod.metadata.name, index, follow), daemon=True
        )
        thread.start()
        self.threads.append(thread)

    def _copy(self, pod_name: str, index: str, follow: bool) -> None:
        try:
            response = self.core.read_namespaced_pod_log(
                pod_name,
                self.namespace,
                container=CONTAINER,
                follow=follow,
                _preload_content=False,
            )
            for line in iter_resp_lines(response):
                log.info("[worker-%s] %s", index, line)
        except ApiException as e:
            log.warning("[worker-%s] no log from pod %s: %s", index, pod_name, e.reason)


def _job_outcome(job) -> tuple[str, str] | None:
    """('Complete' or 'Failed', reason: message) once the job finished, else None."""
    for condition in (job.status and job.status.conditions) or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return condition.type, f"{condition.reason}: {condition.message}"
    return None


def _pod_failures(pods) -> list[str]:
    """Why worker containers terminated with an error (exit code, reason, message)."""
    failures = []
    for pod in pods:
        for status in pod.status.container_statuses or []:
            for state in (status.state, status.last_state):
                ended = state and state.terminated
                if ended and ended.exit_code:
                    failures.append(
                        f"{pod.metadata.name}: exit code {ended.exit_code} ({ended.reason})"
                        + (f": {ended.message.strip()}" if ended.message else "")
                    )
    return failures


def _wait_for_job(
    batch: client.BatchV1Api, namespace: str, name: str, logs: _PodLogs, timeout_s: int
) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stream = watch.Watch().stream(
            batch.list_namespaced_job,
            namespace,
            field_selector=f"metadata.name={name}",
            timeout_seconds=max(1, int(deadline - time.monotonic())),
        )
        for event in stream:
            logs.follow_started()
            outcome = _job_outcome(event["object"])
            if outcome:
                return outcome
    raise WorkerGroupError(f"job {namespace}/{name} did not finish within {timeout_s} s")


def _delete(delete_fn, name: str, namespace: str) -> None:
    try:
        delete_fn(name, namespace, propagation_policy="Background")
    except ApiException as e:
        if e.status != 404:
            log.warning("could not delete %s/%s: %s", namespace, name, e.reason)


def default_api_client() -> client.ApiClient:
    """An API client from the in-cluster service account, else from the kubeconfig."""
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    return client.ApiClient()


def run_on_kubernetes(
    name: str, spec_path: str, config: MultiWorkerConfig, api_client: client.ApiClient | None = None
) -> None:
    """Runs the workers as Job `name`, streams their logs, reports failure, cleans up."""
    k8s = config.kubernetes
    if not spec_path.startswith(k8s.mount_path.rstrip("/") + "/"):
        raise ValueError(
            f"the pipeline root must be on the shared volume: worker spec {spec_path} is not "
            f"under kubernetes.mount_path {k8s.mount_path}"
        )
    api_client = api_client or default_api_client()
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    namespace = k8s.namespace
    core.create_namespaced_service(namespace, build_service(name, config))
    try:
        batch.create_namespaced_job(namespace, build_job(name, spec_path, config))
        log.info("created job %s/%s with %d workers", namespace, name, config.num_workers)
        logs = _PodLogs(core, namespace, name)
        outcome, detail = _wait_for_job(batch, namespace, name, logs, k8s.poll_timeout_s)
        logs.finish()
        if outcome == "Failed":
            failures = "\n".join(_pod_failures(logs.pods())) or "(no failed container seen)"
            raise WorkerGroupError(f"job {namespace}/{name} failed: {detail}\n{failures}")
        log.info("job %s/%s completed", namespace, name)
    finally:
        _delete(batch.delete_namespaced_job, name, namespace)
        _delete(core.delete_namespaced_service, name, namespace)
