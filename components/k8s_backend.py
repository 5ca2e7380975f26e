"""The `kubernetes` backend: the workers as an Indexed Job behind a headless Service.

Why a plain Indexed Job (batch/v1) and not a Kubeflow TFJob: it needs no operator on the
cluster. Pod `i` of an Indexed Job gets the hostname `<job>-<i>` and, with `subdomain` set to
a headless Service of the same name, the DNS name `<job>-<i>.<job>`; so every worker can be
given the whole cluster on its command line, and takes its own index from
`JOB_COMPLETION_INDEX`, which Kubernetes sets in Indexed Jobs.

Fault tolerance is Kubernetes' own: `restartPolicy: OnFailure` restarts a failed worker in
place (the survivors fail on the broken collective and restart too), `backoffLimit` caps the
restarts, and the Trainer module's BackupAndRestore checkpoint on the shared volume lets the
group resume. A worker that fails after a peer has finished (the chief writing the export)
cannot resume: restarted, it would wait for that peer's collectives until the Job's deadline,
so the group fails then, quoting it. The pipeline root lives on a PersistentVolumeClaim mounted
at the same path in every worker, so the paths in the worker spec are valid there.

Cleanup does not rely on the trainer alone: the Job has an `activeDeadlineSeconds` and a
`ttlSecondsAfterFinished`, belongs to the retraining pod when the trainer runs in one, and
owns the Service (created right after it, long before a worker resolves its peers).
"""

import logging
import os
import threading
import time

from kubernetes import client, watch
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from components.multiworker_config import KubernetesConfig, MultiWorkerConfig
from components.worker_launcher import WorkerGroupError

log = logging.getLogger(__name__)

CONTAINER = "worker"
JOB_LABEL = "stn-pipeline/job"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# The retraining pod's namespace, name and uid, from the downward API (k8s/base).
NAMESPACE_ENV, POD_NAME_ENV, POD_UID_ENV = "STN_NAMESPACE", "STN_POD_NAME", "STN_POD_UID"
DEFAULT_NAMESPACE = "default"
# A finished worker Job (and with it, its Service) stays this long for inspection when
# nobody deleted it: the trainer was killed before its cleanup ran.
FINISHED_TTL_S = 24 * 3600
# How often the pods are checked while the Job does not change.
CHECK_INTERVAL_S = 30
# How long a worker may wait on a fault that can pass: the kubelet retries a pull at 10, 20,
# 40, 80 s, and a container config may wait on a Secret or ConfigMap being created.
RETRY_GRACE_S = 120
# Waiting reasons of a worker container that stop the group: (what is wrong, grace in s).
STUCK_REASONS = {
    "InvalidImageName": ("image", 0),
    "ErrImageNeverPull": ("image", 0),
    "ErrImagePull": ("image", RETRY_GRACE_S),
    "ImagePullBackOff": ("image", RETRY_GRACE_S),
    "CreateContainerConfigError": ("container config", RETRY_GRACE_S),
    "CreateContainerError": ("container config", RETRY_GRACE_S),
}


def worker_namespace(k8s: KubernetesConfig, environ=os.environ) -> str:
    """The configured namespace, else the retraining pod's (`STN_NAMESPACE`), else default."""
    return k8s.namespace or environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE


def retraining_pod_owner(namespace: str, environ=os.environ) -> dict | None:
    """An owner reference to the pod this process runs in (downward API), if it is in
    `namespace`: deleting that pod then deletes the workers' Job and Service too."""
    name, uid = environ.get(POD_NAME_ENV), environ.get(POD_UID_ENV)
    if not (name and uid) or environ.get(NAMESPACE_ENV) != namespace:
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def worker_hosts(name: str, num_workers: int, port: int) -> list[str]:
    """The workers' `host:port`, resolvable through the headless Service `name`."""
    return [f"{name}-{i}.{name}:{port}" for i in range(num_workers)]


def _metadata(name: str, namespace: str, owner: dict | None) -> dict:
    metadata = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/managed-by": "stn-pipeline", JOB_LABEL: name},
    }
    if owner:
        metadata["ownerReferences"] = [owner]
    return metadata


def build_service(
    name: str, config: MultiWorkerConfig, namespace: str, owner: dict | None = None
) -> dict:
    """The headless Service that gives each worker pod a stable DNS name."""
    k8s = config.kubernetes
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, owner),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_LABEL: name},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "grpc", "port": k8s.port, "targetPort": k8s.port}],
        },
    }


def build_job(
    name: str, spec_path: str, config: MultiWorkerConfig, namespace: str, owner: dict | None = None
) -> dict:
    """The Indexed Job of `config.num_workers` workers running `run_fn` from `spec_path`."""
    k8s = config.kubernetes
    hosts = ",".join(worker_hosts(name, config.num_workers, k8s.port))
    # Limits equal requests (Guaranteed QoS): a worker that is throttled or evicted stalls the
    # whole group on the next collective.
    requests = {"cpu": k8s.cpu, "memory": k8s.memory}
    if k8s.gpus_per_worker:
        requests["nvidia.com/gpu"] = str(k8s.gpus_per_worker)
    resources = {"requests": requests, "limits": dict(requests)}
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
        # The kubelet puts the end of a failed run's log into its terminated state's message
        # (the worker writes no termination file): the error of a failed Job quotes it.
        "terminationMessagePolicy": "FallbackToLogsOnError",
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
        "metadata": _metadata(name, namespace, owner),
        "spec": {
            "completionMode": "Indexed",
            "completions": config.num_workers,
            "parallelism": config.num_workers,
            # One broken worker makes every worker fail on the collective: a group restart
            # costs num_workers container restarts.
            "backoffLimit": config.max_restarts * config.num_workers,
            # Kubernetes itself stops and removes the workers if the trainer cannot.
            "activeDeadlineSeconds": k8s.poll_timeout_s,
            "ttlSecondsAfterFinished": FINISHED_TTL_S,
            "template": {"metadata": {"labels": {JOB_LABEL: name}}, "spec": pod_spec},
        },
    }


def _container_run(pod) -> tuple[str, int] | None:
    """(pod name, restart count) of the worker container's current run once it started."""
    for status in pod.status.container_statuses or []:
        if (
            status.name == CONTAINER
            and status.state
            and (status.state.running or status.state.terminated)
        ):
            return pod.metadata.name, status.restart_count
    return None


class _PodLogs:
    """Copies each run of each worker container into this process's log as `[worker-i] ...`."""

    def __init__(self, core: client.CoreV1Api, namespace: str, name: str):
        self.core, self.namespace, self.name = core, namespace, name
        self.read: set[tuple[str, int]] = set()
        self.threads: list[threading.Thread] = []

    def pods(self) -> list:
        return self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{JOB_LABEL}={self.name}"
        ).items

    def follow_started(self, pods) -> None:
        """Follows the worker containers that started since the last call (restarts too)."""
        for pod in pods:
            run = _container_run(pod)
            if run and run not in self.read:
                self._start(pod, run, follow=True)

    def finish(self) -> None:
        """Waits for the followers, then reads the container runs never read (a read that
        found its container waiting is among them)."""
        self._join()
        for pod in self.pods():
            run = _container_run(pod)
            if run and run not in self.read:
                self._start(pod, run, follow=False)
        self._join()

    def _join(self) -> None:
        for thread in self.threads:
            thread.join()

    def _start(self, pod, run: tuple[str, int], follow: bool) -> None:
        self.read.add(run)
        index = (pod.metadata.annotations or {}).get(INDEX_ANNOTATION, "?")
        thread = threading.Thread(target=self._copy, args=(run, index, follow), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _copy(self, run: tuple[str, int], index: str, follow: bool) -> None:
        pod_name = run[0]
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
            if e.status == 400:  # the container is waiting (to start, or to restart): retry
                self.read.discard(run)
                log.debug("[worker-%s] log of pod %s not ready: %s", index, pod_name, e.body)
            else:
                log.warning("[worker-%s] no log from pod %s: %s", index, pod_name, e.reason)


def _waiting_reason(pod) -> tuple[str, str] | None:
    """(reason, message) of why a worker pod has not started: no node takes it, or its
    container waits (ContainerCreating, ImagePullBackOff, ...); None once it started."""
    for condition in pod.status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return condition.reason or "Unscheduled", condition.message or ""
    for status in pod.status.container_statuses or []:
        waiting = status.name == CONTAINER and status.state and status.state.waiting
        if waiting:
            message = " ".join(filter(None, [waiting.message, f"(image {status.image})"]))
            return waiting.reason or "Waiting", message
    return None


class _StartupWatch:
    """Logs why worker pods wait, and fails the group when one cannot start: no node takes it
    for `unschedulable_grace_s`, or its image or container config is broken (STUCK_REASONS).

    A pod the API server refuses (a ResourceQuota, a missing service account, Pod Security)
    never exists: the Job controller only records a warning event. So while the Job has fewer
    pods than `expected_pods`, its warnings (`job_warnings()`: (reason, message) pairs) are
    logged, and after `unschedulable_grace_s` the group fails with them.
    """

    def __init__(
        self, namespace: str, unschedulable_grace_s: int, expected_pods=0, job_warnings=list
    ):
        self.namespace = namespace
        self.unschedulable_grace_s = unschedulable_grace_s
        self.expected_pods = expected_pods
        self.job_warnings = job_warnings
        self.logged: set[tuple[str, str]] = set()
        self.since: dict[tuple[str, str], float] = {}  # (pod, what is wrong): first seen
        self.missing_since: float | None = None

    def _trouble(self, reason: str) -> tuple[str, int] | None:
        if reason == "Unschedulable":
            return "scheduling", self.unschedulable_grace_s
        return STUCK_REASONS.get(reason)

    def check(self, pods, now: float) -> None:
        """Raises WorkerGroupError for a pod stuck past its grace; `now` is time.monotonic()."""
        self._check_missing(len(pods), now)
        stuck = {}
        for pod in pods:
            waiting = _waiting_reason(pod)
            if waiting is None:
                continue
            name, (reason, message) = pod.metadata.name, waiting
            trouble = self._trouble(reason)
            if (name, reason) not in self.logged:
                self.logged.add((name, reason))
                gives_up = f"; giving up after {trouble[1]} s" if trouble else ""
                log.info("worker pod %s is waiting: %s: %s%s", name, reason, message, gives_up)
            if trouble:
                stuck[name, trouble[0]] = reason, message, trouble[1]
        self.since = {key: self.since.get(key, now) for key in stuck}
        for key, (reason, message, grace) in stuck.items():
            if now - self.since[key] >= grace:
                raise WorkerGroupError(
                    f"worker pod {self.namespace}/{key[0]} cannot start: {reason}: {message}"
                )

    def _check_missing(self, count: int, now: float) -> None:
        if count >= self.expected_pods:
            self.missing_since = None
            return
        if self.missing_since is None:
            self.missing_since = now
        warnings = list(dict.fromkeys(self.job_warnings()))
        for reason, message in warnings:
            if ("job", message) not in self.logged:
                self.logged.add(("job", message))
                log.info(
                    "the workers' job cannot create a pod: %s: %s; giving up after %d s",
                    reason,
                    message,
                    self.unschedulable_grace_s,
                )
        if now - self.missing_since >= self.unschedulable_grace_s:
            why = "; ".join(f"{r}: {m}" for r, m in warnings) or "no event of the job says why"
            raise WorkerGroupError(
                f"the workers' job in {self.namespace} has {count} of {self.expected_pods} "
                f"pods after {self.unschedulable_grace_s} s: {why}"
            )


def _warnings_about(core: client.CoreV1Api, namespace: str, uid: str) -> list[tuple[str, str]]:
    """(reason, message) of the warning events about the object `uid`, e.g. FailedCreate."""
    try:
        events = core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.uid={uid}"
        ).items
    except ApiException as e:  # a Role without events: list; the grace still ends the wait
        log.debug("cannot list the events of %s: %s", uid, e.reason)
        return []
    return [(e.reason, e.message) for e in events if e.type == "Warning"]


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


def _stranded_worker(pods) -> str | None:
    """Why a worker cannot finish because a peer already has, or None: it failed, or started
    (again, or in a pod made anew), after the first peer finished, and would wait for that
    peer's collectives until the Job's deadline. The API's times are whole seconds, so the
    second a peer finished counts (no recovery follows a finish)."""
    finished = [
        status.state.terminated.finished_at
        for pod in pods
        for status in pod.status.container_statuses or []
        if status.state and status.state.terminated and status.state.terminated.exit_code == 0
    ]
    if not finished or None in finished:
        return None
    first = min(finished)
    for pod in pods:
        for status in pod.status.container_statuses or []:
            for state in (status.state, status.last_state):
                ended = state and state.terminated
                if ended and ended.exit_code and ended.finished_at and ended.finished_at >= first:
                    message = f": {ended.message.strip()}" if ended.message else ""
                    return (
                        f"worker pod {pod.metadata.name} failed (exit code {ended.exit_code}, "
                        f"{ended.reason}) after a peer had finished, so it cannot resume{message}"
                    )
            running = status.state and status.state.running
            if running and running.started_at and running.started_at >= first:
                return (
                    f"worker pod {pod.metadata.name} started after a peer had finished, so it "
                    "cannot resume"
                )
    return None


def _wait_for_job(
    batch: client.BatchV1Api, namespace: str, name: str, check_pods, timeout_s: int
) -> tuple[str, str]:
    """Watches the Job to its end, calling `check_pods()` on each change and at least every
    CHECK_INTERVAL_S (pods that cannot start do not change the Job)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        stream = watch.Watch().stream(
            batch.list_namespaced_job,
            namespace,
            field_selector=f"metadata.name={name}",
            timeout_seconds=max(1, int(min(left, CHECK_INTERVAL_S))),
        )
        for event in stream:
            outcome = _job_outcome(event["object"])
            if outcome:
                return outcome
            check_pods()
        check_pods()
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


def _owner_reference(job: client.V1Job) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job.metadata.name,
        "uid": job.metadata.uid,
    }


def run_on_kubernetes(
    name: str, spec_path: str, config: MultiWorkerConfig, api_client: client.ApiClient | None = None
) -> None:
    """Runs the workers as Job `name`, streams their logs, reports failure, cleans up.

    The Job belongs to the retraining pod when it runs in one (`retraining_pod_owner`), the
    Service to the Job: whatever stops the trainer, Kubernetes removes the workers."""
    k8s = config.kubernetes
    if not spec_path.startswith(k8s.mount_path.rstrip("/") + "/"):
        raise ValueError(
            f"the pipeline root must be on the shared volume: worker spec {spec_path} is not "
            f"under kubernetes.mount_path {k8s.mount_path}"
        )
    api_client = api_client or default_api_client()
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    namespace = worker_namespace(k8s)
    job = build_job(name, spec_path, config, namespace, retraining_pod_owner(namespace))
    created = batch.create_namespaced_job(namespace, job)
    try:
        service = build_service(name, config, namespace, _owner_reference(created))
        core.create_namespaced_service(namespace, service)
        log.info("created job %s/%s with %d workers", namespace, name, config.num_workers)
        logs = _PodLogs(core, namespace, name)
        startup = _StartupWatch(
            namespace,
            k8s.unschedulable_grace_s,
            expected_pods=config.num_workers,
            job_warnings=lambda: _warnings_about(core, namespace, created.metadata.uid),
        )

        # Every failed container run seen, in order: once the Job fails for good, Kubernetes
        # terminates its pods (restartPolicy OnFailure), and their statuses go with them.
        failures = {}

        def check_pods():
            pods = logs.pods()
            failures.update(dict.fromkeys(_pod_failures(pods)))
            logs.follow_started(pods)
            startup.check(pods, time.monotonic())
            if stranded := _stranded_worker(pods):
                raise WorkerGroupError(stranded)

        outcome, detail = _wait_for_job(batch, namespace, name, check_pods, k8s.poll_timeout_s)
        logs.finish()
        if outcome == "Failed":
            failures.update(dict.fromkeys(_pod_failures(logs.pods())))
            seen = "\n".join(failures) or "(no failed container seen)"
            raise WorkerGroupError(f"job {namespace}/{name} failed: {detail}\n{seen}")
        log.info("job %s/%s completed", namespace, name)
    finally:
        _delete(batch.delete_namespaced_job, name, namespace)
        _delete(core.delete_namespaced_service, name, namespace)
