"""The multi-worker trainer: local worker groups, sharding, fault tolerance, Kubernetes objects."""

import dataclasses
import http.server
import json
import logging
import os
import signal
import threading
import time
import urllib.parse

import kubernetes
import kubernetes_validate
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from tfx.proto import trainer_pb2
from tfx.types import artifact_utils, standard_artifacts
from tfx.utils import json_utils, proto_utils

from components.input_shards import worker_records
from components.k8s_backend import build_job, build_service, run_on_kubernetes
from components.multiworker_config import CONFIG_KEY, KubernetesConfig, MultiWorkerConfig
from components.multiworker_trainer import MultiWorkerExecutor, MultiWorkerTrainer, split_config
from components.multiworker_worker import task_of, tf_config_for
from components.worker_launcher import WorkerGroupError, run_local

MODULE_FILE = os.path.join(os.path.dirname(__file__), "multiworker_module.py")
IMAGE_SIZE = 12


def _image(label: int, rng: np.random.Generator) -> bytes:
    """A 12x12 grey image: noise plus a bright row at `label` (a learnable class)."""
    pixels = rng.integers(0, 80, size=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8)
    pixels[label + 1] = 255
    return tf.io.encode_png(pixels).numpy()


def _example(label: int, rng: np.random.Generator) -> bytes:
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_image(label, rng)])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_examples(root, count: int, files: int = 1, seed: int = 0):
    """An Examples artifact with `count` train and 20 eval examples in gzipped TFRecords."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("eval", 20)):
        folder = root / f"Split-{split}"
        folder.mkdir(parents=True)
        for f in range(files):
            path = str(folder / f"data_tfrecord-{f:05d}-of-{files:05d}.gz")
            with tf.io.TFRecordWriter(path, options="GZIP") as writer:
                for i in range(f, n, files):
                    writer.write(_example(i % 10, rng))
    examples = standard_artifacts.Examples()
    examples.uri = str(root)
    examples.split_names = artifact_utils.encode_split_names(["train", "eval"])
    return examples


def run_executor(tmp_path, examples, config: MultiWorkerConfig, steps: int, **custom):
    """Runs the multi-worker executor as TFX would; returns (model_run dir, serving dir)."""
    model = standard_artifacts.Model()
    model.uri = str(tmp_path / "model")
    model_run = standard_artifacts.ModelRun()
    model_run.uri = str(tmp_path / "model_run")
    exec_properties = {
        "train_args": proto_utils.proto_to_json(trainer_pb2.TrainArgs(num_steps=steps)),
        "eval_args": proto_utils.proto_to_json(trainer_pb2.EvalArgs(num_steps=2)),
        "module_file": MODULE_FILE,
        "custom_config": json_utils.dumps({**custom, CONFIG_KEY: config.to_dict()}),
    }
    MultiWorkerExecutor().Do(
        {"examples": [examples]}, {"model": [model], "model_run": [model_run]}, exec_properties
    )
    return tmp_path / "model_run", tmp_path / "model" / "Format-Serving"


class LogLines(logging.Handler):
    """Collects the launcher's log lines (the workers' output arrives through it)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def launcher_log():
    handler = LogLines()
    logger = logging.getLogger("components.worker_launcher")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)


def worker_report(model_run, index):
    return json.loads((model_run / f"worker-{index}.json").read_text())


@pytest.mark.slow
def test_two_local_workers_train_export_and_read_disjoint_shards(tmp_path, launcher_log):
    examples = write_examples(tmp_path / "examples", count=64)
    model_run, serving = run_executor(
        tmp_path, examples, MultiWorkerConfig(num_workers=2), steps=8, per_replica_batch=4
    )
    loaded = keras.models.load_model(serving)
    probe = tf.zeros([3, IMAGE_SIZE, IMAGE_SIZE, 1])
    assert loaded(probe).shape == (3, 10)

    shards = [set(worker_report(model_run, i)["shard"]) for i in range(2)]
    everything = worker_records(
        [str(tmp_path / "examples" / "Split-train" / "*")], tf.distribute.InputContext(1, 0)
    )
    assert len(shards[0]) == len(shards[1]) == 32
    assert not shards[0] & shards[1]
    assert sum(1 for _ in everything) == 64
    assert any(
        line.startswith("[worker-0]") and "input shard 0 of 2 by DATA" in line
        for line in launcher_log
    )
    assert any(
        line.startswith("[worker-1]") and "input shard 1 of 2 by DATA" in line
        for line in launcher_log
    )


@pytest.mark.slow
def test_two_workers_match_one_worker_at_the_same_global_batch_and_seed(tmp_path):
    """Same data order, same global batch (1 x 16 against 2 x 8), same seed: the all-reduced
    gradient is the same mean, so the per-epoch losses agree up to float summation order."""
    examples = write_examples(tmp_path / "examples", count=64)
    losses = {}
    for workers in (1, 2):
        model_run, _ = run_executor(
            tmp_path / f"w{workers}",
            examples,
            MultiWorkerConfig(num_workers=workers),
            steps=12,
            per_replica_batch=16 // workers,
            epochs=3,
            seed=7,
        )
        losses[workers] = worker_report(model_run, 0)["loss"]
    assert len(losses[1]) == 3 and losses[1][-1] < losses[1][0]  # it learned something
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4)


def test_killed_worker_group_restarts_and_resumes_from_checkpoint(tmp_path, launcher_log):
    examples = write_examples(tmp_path / "examples", count=64)
    backup = tmp_path / "model_run" / "backup" / "chief"
    state = {}

    def kill_worker_1_after_a_checkpoint():
        while not list(backup.glob("ckpt-*.index")):  # glob of a missing folder is empty
            time.sleep(0.2)
        pid = next(
            int(line.split("pid ")[1]) for line in launcher_log if "started worker-1, pid" in line
        )
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        state["killed"] = pid

    killer = threading.Thread(target=kill_worker_1_after_a_checkpoint, daemon=True)
    killer.start()
    config = MultiWorkerConfig(num_workers=2, max_restarts=2)
    _, serving = run_executor(
        tmp_path,
        examples,
        config,
        steps=24,
        per_replica_batch=4,
        epochs=2,
        save_freq=4,
        step_delay_s=0.4,
    )
    killer.join(timeout=5)
    assert "killed" in state
    assert any("worker-1 was killed by SIGKILL" in line for line in launcher_log)
    restart = next(line for line in launcher_log if "restarting all 2 workers" in line)
    resumed_at = int(restart.rsplit("checkpoint step ", 1)[1])
    assert resumed_at > 0
    starts = [
        line for line in launcher_log if line.startswith("[worker-0] training starts at step")
    ]
    assert starts[0].endswith("step 0") and starts[-1].endswith(f"step {resumed_at}")
    assert keras.models.load_model(serving)(tf.zeros([2, IMAGE_SIZE, IMAGE_SIZE, 1])).shape == (
        2,
        10,
    )


def test_failed_workers_are_reported_with_their_stderr_and_restarted(tmp_path, launcher_log):
    missing = str(tmp_path / "no-such-spec.json")
    with pytest.raises(WorkerGroupError) as failure:
        run_local(missing, num_workers=2, max_restarts=1, backup_dir=str(tmp_path / "backup"))
    text = str(failure.value)
    assert "after 1 restart(s) of 2 workers" in text
    assert "exited with code 1; last lines of its stderr" in text
    assert f"cannot read the worker spec {missing}" in text
    assert sum("started worker-0" in line for line in launcher_log) == 2
    assert any(
        "restarting all 2 workers (restart 1 of 1); resuming from step 0" in line
        for line in launcher_log
    )


@pytest.mark.slow
def test_mixed_precision_worker_trains_with_float16_layers(tmp_path):
    examples = write_examples(tmp_path / "examples", count=32)
    _, serving = run_executor(
        tmp_path,
        examples,
        MultiWorkerConfig(num_workers=1, mixed_precision=True),
        steps=2,
        per_replica_batch=8,
    )
    hidden, logits = keras.models.load_model(serving).layers[1:]
    assert hidden.dtype_policy.name == "mixed_float16" and hidden.compute_dtype == "float16"
    assert logits.compute_dtype == "float32"


def test_worker_records_shard_by_file_with_enough_files_else_by_data(tmp_path):
    write_examples(tmp_path / "three", count=30, files=3)
    write_examples(tmp_path / "one", count=30, files=1)

    def shard(root, workers, index):
        records = worker_records(
            [str(root / "Split-train" / "*")], tf.distribute.InputContext(workers, index)
        )
        return [r.numpy() for r in records]

    for root in (tmp_path / "three", tmp_path / "one"):
        whole = shard(root, 1, 0)
        parts = [shard(root, 2, i) for i in range(2)]
        assert len(whole) == 30 and sorted(parts[0] + parts[1]) == sorted(whole)
        assert not set(parts[0]) & set(parts[1])
    # by FILE: worker 0 reads files 0 and 2 (10 records each), worker 1 file 1
    assert [len(shard(tmp_path / "three", 2, i)) for i in range(2)] == [20, 10]
    # by DATA: records 0, 2, 4, ... and 1, 3, 5, ... of the single file
    assert shard(tmp_path / "one", 2, 1) == shard(tmp_path / "one", 1, 0)[1::2]
    with pytest.raises(ValueError, match="no files match"):
        shard(tmp_path / "none", 2, 0)


def test_worker_tf_config_and_roles():
    config = tf_config_for(["a:1", "b:2", "c:3"], 2)
    assert config == {
        "cluster": {"worker": ["a:1", "b:2", "c:3"]},
        "task": {"type": "worker", "index": 2},
    }
    assert task_of(config) == (2, 3, False)
    assert task_of(tf_config_for(["a:1", "b:2"], 0)) == (0, 2, True)
    with_chief = {
        "cluster": {"chief": ["c:0"], "worker": ["w:1"]},
        "task": {"type": "worker", "index": 0},
    }
    assert task_of(with_chief) == (1, 2, False)
    assert task_of({}) == (0, 1, True)
    with pytest.raises(ValueError, match="outside the cluster"):
        tf_config_for(["a:1"], 1)


def test_config_is_validated_and_travels_in_custom_config():
    with pytest.raises(ValueError, match="num_workers"):
        MultiWorkerConfig(num_workers=0)
    with pytest.raises(ValueError, match="backend"):
        MultiWorkerConfig(backend="slurm")
    with pytest.raises(ValueError, match="needs the 'kubernetes' settings"):
        MultiWorkerConfig(backend="kubernetes")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['workers'\]"):
        MultiWorkerConfig.from_dict({"workers": 2})
    with pytest.raises(ValueError, match=r"kubernetes\.pvc"):
        MultiWorkerConfig.from_dict(
            {"backend": "kubernetes", "kubernetes": {"image": "i", "pvc": "", "mount_path": "/m"}}
        )
    assert MultiWorkerConfig.from_dict(K8S_CONFIG.to_dict()) == K8S_CONFIG

    properties = {
        "custom_config": json_utils.dumps({"epochs": 3, CONFIG_KEY: K8S_CONFIG.to_dict()})
    }
    config, for_run_fn = split_config(properties)
    assert config == K8S_CONFIG
    assert json_utils.loads(for_run_fn["custom_config"]) == {"epochs": 3}
    with pytest.raises(ValueError, match="lacks the 'multiworker' settings"):
        split_config({"custom_config": "null"})


def test_component_keeps_the_trainer_spec():
    from tfx.components import Trainer
    from tfx.types import Channel

    examples = Channel(type=standard_artifacts.Examples)
    trainer = MultiWorkerTrainer(
        MultiWorkerConfig(num_workers=3),
        examples=examples,
        module_file=MODULE_FILE,
        custom_config={"epochs": 2},
    )
    assert isinstance(trainer, Trainer)
    assert set(trainer.outputs) == {"model", "model_run"}
    assert trainer.executor_spec.executor_class is MultiWorkerExecutor
    custom = json_utils.loads(trainer.exec_properties["custom_config"])
    assert custom == {"epochs": 2, CONFIG_KEY: MultiWorkerConfig(num_workers=3).to_dict()}
    with pytest.raises(ValueError, match="reserved"):
        MultiWorkerTrainer(
            MultiWorkerConfig(),
            examples=examples,
            module_file=MODULE_FILE,
            custom_config={CONFIG_KEY: {}},
        )


# ---------------------------------------------------------------- Kubernetes backend

K8S = KubernetesConfig(
    image="registry.example/stn-pipeline:0.1",
    pvc="stn-home",
    mount_path="/stn_home",
    gpus_per_worker=1,
    cpu="4",
    memory="16Gi",
    node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
)
K8S_CONFIG = MultiWorkerConfig(num_workers=2, backend="kubernetes", max_restarts=3, kubernetes=K8S)
SPEC = "/stn_home/pipeline_root/Trainer/model_run/7/multiworker_spec.json"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image", "", "kubernetes.image must be a non-empty string"),
        ("mount_path", "stn_home", "kubernetes.mount_path must be absolute, got 'stn_home'"),
        ("gpus_per_worker", -1, "kubernetes.gpus_per_worker must be an integer >= 0, got -1"),
        ("gpus_per_worker", True, "kubernetes.gpus_per_worker must be an integer >= 0, got True"),
        ("port", "2222", "kubernetes.port must be an integer in 1..65535, got '2222'"),
        ("port", 70000, "kubernetes.port must be an integer in 1..65535, got 70000"),
        ("poll_timeout_s", 0, "kubernetes.poll_timeout_s must be an integer >= 1, got 0"),
        ("tolerations", {"key": "x"}, "kubernetes.tolerations must be a list"),
    ],
)
def test_kubernetes_settings_name_the_bad_field(field, value, message):
    with pytest.raises(ValueError) as error:
        dataclasses.replace(K8S, **{field: value})
    assert str(error.value).startswith(message)


def test_kubernetes_objects_validate_against_the_kubernetes_1_30_schemas():
    service = build_service("stn-trainer-1", K8S_CONFIG)
    job = build_job("stn-trainer-1", SPEC, K8S_CONFIG)
    for doc in (service, job):
        kubernetes_validate.validate(doc, "1.30", strict=True)
    pod = job["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 6 and pod["restartPolicy"] == "OnFailure"
    expected = {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert worker["resources"] == {"requests": expected, "limits": expected}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert worker["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["nodeSelector"] == K8S.node_selector and pod["tolerations"] == K8S.tolerations
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "stn-home"
    assert worker["volumeMounts"][0]["mountPath"] == "/stn_home"
    assert (
        pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    )
    assert worker["args"] == [
        "--cluster",
        "stn-trainer-1-0.stn-trainer-1:2222,stn-trainer-1-1.stn-trainer-1:2222",
    ]
    # a wrong field is caught by the same validation, so the check above is not vacuous
    worker["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.30", strict=True)


class FakeApiServer(http.server.ThreadingHTTPServer):
    """A loopback stand-in for kube-apiserver: answers the calls the backend makes, as the
    real API does (JSON objects, watch events as JSON lines, plain-text logs), and records
    every request. `job_result` is 'Complete' or 'Failed'."""

    def __init__(self, job_result: str):
        super().__init__(("127.0.0.1", 0), _FakeApiHandler)
        self.job_result = job_result
        self.requests = []
        self.created = {}

    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FakeApiHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code, body, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self):
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        query = dict(urllib.parse.parse_qsl(url.query))
        self.server.requests.append((self.command, url.path, query, body))
        return url.path, query, body

    def do_POST(self):
        path, _, body = self._record()
        kind = {"services": "Service", "jobs": "Job"}.get(path.rsplit("/", 1)[-1])
        if kind is None:
            return self._send(404, _status(404, "NotFound"))
        created = {
            **body,
            "metadata": {
                **body["metadata"],
                "uid": "u-1",
                "resourceVersion": "1",
                "creationTimestamp": "2026-11-25T14:00:00Z",
            },
        }
        self.server.created[kind] = created
        self._send(201, created)

    def do_DELETE(self):
        self._record()
        self._send(200, _status(200, "Success"))

    def do_GET(self):
        path, query, _ = self._record()
        job = self.server.created.get("Job")
        if path.endswith("/jobs") and query.get("watch", "").lower() == "true":  # Go's ParseBool
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            for status in ({}, {"active": 2}, _final_status(self.server.job_result)):
                event = {"type": "MODIFIED", "object": {**job, "status": status}}
                self.wfile.write((json.dumps(event) + "\n").encode())
            return None
        if path.endswith("/pods"):
            name = job["metadata"]["name"]
            assert query["labelSelector"] == f"stn-pipeline/job={name}"
            return self._send(
                200,
                {
                    "apiVersion": "v1",
                    "kind": "PodList",
                    "metadata": {},
                    "items": [_pod(name, i, self.server.job_result) for i in range(2)],
                },
            )
        if path.endswith("/log"):
            pod = path.split("/")[-2]
            return self._send(200, f"{pod} starts\n{pod} trained\n", "text/plain")
        return self._send(404, _status(404, "NotFound"))


def _status(code, reason):
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "code": code,
        "reason": reason,
        "status": "Success" if code < 400 else "Failure",
    }


def _final_status(result):
    condition = {
        "type": result,
        "status": "True",
        "lastTransitionTime": "2026-11-25T14:05:00Z",
        "reason": "BackoffLimitExceeded" if result == "Failed" else "Completed",
        "message": "Job has reached the specified backoff limit"
        if result == "Failed"
        else "Job completed",
    }
    return {"conditions": [condition], ("failed" if result == "Failed" else "succeeded"): 2}


def _pod(job_name, index, result):
    failed = result == "Failed" and index == 1
    terminated = {
        "exitCode": 1 if failed else 0,
        "reason": "Error" if failed else "Completed",
        "message": "ValueError: no files match the patterns" if failed else None,
        "startedAt": "2026-11-25T14:01:00Z",
        "finishedAt": "2026-11-25T14:04:00Z",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job_name}-{index}-x7k{index}",
            "namespace": "default",
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "status": {
            "phase": "Failed" if failed else "Succeeded",
            "containerStatuses": [
                {
                    "name": "worker",
                    "ready": False,
                    "restartCount": 6 if failed else 0,
                    "image": K8S.image,
                    "imageID": "sha256:abc",
                    "state": {"terminated": terminated},
                }
            ],
        },
    }


@pytest.fixture
def fake_apiserver(request):
    server = FakeApiServer(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _api_client(server):
    configuration = kubernetes.client.Configuration()
    configuration.host = server.url()
    return kubernetes.client.ApiClient(configuration)


@pytest.mark.parametrize("fake_apiserver", ["Complete"], indirect=True)
def test_kubernetes_backend_creates_watches_streams_and_deletes(fake_apiserver, caplog):
    caplog.set_level(logging.INFO, logger="components.k8s_backend")
    run_on_kubernetes("stn-trainer-1", SPEC, K8S_CONFIG, _api_client(fake_apiserver))

    calls = [(method, path) for method, path, _, _ in fake_apiserver.requests]
    base = "/api/v1/namespaces/default"
    jobs = "/apis/batch/v1/namespaces/default/jobs"
    assert calls[:3] == [("POST", f"{base}/services"), ("POST", jobs), ("GET", jobs)]
    assert calls[-2:] == [
        ("DELETE", f"{jobs}/stn-trainer-1"),
        ("DELETE", f"{base}/services/stn-trainer-1"),
    ]
    posted = {path: body for method, path, _, body in fake_apiserver.requests if method == "POST"}
    assert posted[jobs] == build_job("stn-trainer-1", SPEC, K8S_CONFIG)
    assert posted[f"{base}/services"] == build_service("stn-trainer-1", K8S_CONFIG)
    watch_query = fake_apiserver.requests[2][2]
    assert (
        watch_query["watch"].lower() == "true"
        and watch_query["fieldSelector"] == "metadata.name=stn-trainer-1"
    )
    log_queries = [q for m, p, q, _ in fake_apiserver.requests if p.endswith("/log")]
    assert len(log_queries) == 2 and all(q["container"] == "worker" for q in log_queries)
    messages = [r.getMessage() for r in caplog.records]
    assert "[worker-0] stn-trainer-1-0-x7k0 trained" in messages
    assert "[worker-1] stn-trainer-1-1-x7k1 trained" in messages


@pytest.mark.parametrize("fake_apiserver", ["Failed"], indirect=True)
def test_kubernetes_backend_reports_why_the_job_failed_and_still_cleans_up(fake_apiserver):
    with pytest.raises(WorkerGroupError) as failure:
        run_on_kubernetes("stn-trainer-1", SPEC, K8S_CONFIG, _api_client(fake_apiserver))
    text = str(failure.value)
    assert "BackoffLimitExceeded" in text
    assert "stn-trainer-1-1-x7k1: exit code 1 (Error): ValueError: no files match" in text
    deletes = [p for m, p, _, _ in fake_apiserver.requests if m == "DELETE"]
    assert len(deletes) == 2


def test_kubernetes_backend_needs_the_spec_on_the_shared_volume():
    with pytest.raises(ValueError, match="mount_path"):
        run_on_kubernetes("stn-trainer-1", "/tmp/spec.json", K8S_CONFIG, api_client=object())
