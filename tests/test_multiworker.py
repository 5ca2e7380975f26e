"""The multi-worker trainer: local worker groups, sharding, fault tolerance, Kubernetes objects."""

import collections
import contextlib
import dataclasses
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.parse
from pathlib import Path

import kubernetes
import kubernetes_validate
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
import yaml
from tfx.proto import trainer_pb2
from tfx.types import artifact_utils, standard_artifacts
from tfx.utils import json_utils, proto_utils

from components import k8s_backend, worker_launcher
from components.k8s_backend import (
    _stranded_worker,
    build_job,
    build_service,
    run_on_kubernetes,
)
from components.multiworker_config import CONFIG_KEY, KubernetesConfig, MultiWorkerConfig
from components.multiworker_trainer import MultiWorkerExecutor, MultiWorkerTrainer, split_config
from components.multiworker_worker import task_of, tf_config_for, worker_index
from components.worker_launcher import WorkerGroupError, run_local
from pipeline import cli
from stn_model.input_shards import worker_records

REPO = Path(__file__).resolve().parents[1]

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


STUBBORN_WORKER = """
import os, signal, sys, time
index = int(sys.argv[sys.argv.index("--index") + 1])
if index == 0:  # fails once the others are ready: the failure that stops the group
    while len([n for n in os.listdir(".") if n.startswith("ready-")]) < 2:
        time.sleep(0.05)
    sys.exit(1)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as TF's preemption notifier, or a hung collective
open(f"ready-{index}", "w").close()
time.sleep(600)
"""


def test_workers_that_ignore_sigterm_are_stopped_together(tmp_path, monkeypatch, launcher_log):
    (tmp_path / "stubborn_worker.py").write_text(STUBBORN_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO)]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(worker_launcher, "_STOP_GRACE_S", 2)
    signals = []
    for name in ("terminate", "kill"):
        original = getattr(subprocess.Popen, name)

        def record(process, name=name, original=original):
            signals.append((name, process.pid))
            original(process)

        monkeypatch.setattr(subprocess.Popen, name, record)
    failure = worker_launcher.run_group("spec.json", 3, worker_module="stubborn_worker")
    assert failure.startswith("worker-0 exited with code 1")
    pids = [int(line.rsplit("pid ", 1)[1]) for line in launcher_log if "started worker-" in line]
    # Not one at a time (SIGTERM, grace, SIGKILL per worker): all signalled, then one grace.
    terms, kills = [("terminate", pid) for pid in pids[1:]], [("kill", pid) for pid in pids[1:]]
    assert signals == terms + kills
    assert sum("ignored SIGTERM; killing it" in line for line in launcher_log) == 2


NOISY_WORKER = """
import sys
for i in range(300):
    print(f"warning {i}", file=sys.stderr)
print("the last line: the real error", file=sys.stderr)
sys.exit(1)
"""


class SlowLog(logging.Handler):
    """A log handler that takes 10 ms a line, as one that sends lines to a busy collector."""

    def emit(self, record):
        time.sleep(0.01)


def test_a_failure_quotes_its_workers_stderr_to_the_last_line(tmp_path, monkeypatch):
    (tmp_path / "noisy_worker.py").write_text(NOISY_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO)]))
    logger = logging.getLogger("components.worker_launcher")
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(logger, "handlers", [SlowLog()])
    failure = worker_launcher.run_group("spec.json", 1, worker_module="noisy_worker")
    assert failure.startswith("worker-0 exited with code 1")
    assert failure.endswith("warning 299\nthe last line: the real error")


ENV_WORKER = """
import json, os, sys
names = ["TF_CONFIG", "TF_FORCE_GPU_ALLOW_GROWTH"]
print(json.dumps({name: os.environ.get(name) for name in names}), file=sys.stderr)
sys.exit(1)
"""


def test_workers_share_gpus_by_growth_and_get_no_inherited_tf_config(tmp_path, monkeypatch):
    (tmp_path / "env_worker.py").write_text(ENV_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO)]))
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["elsewhere:1"]}}')
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    failure = worker_launcher.run_group("spec.json", 1, worker_module="env_worker")
    environment = json.loads(failure.rsplit("\n", 1)[1])
    assert environment == {"TF_CONFIG": None, "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def test_workers_run_the_installed_module_not_one_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "components").mkdir()
    (tmp_path / "components" / "__init__.py").write_text("")
    (tmp_path / "components" / "multiworker_worker.py").write_text(
        "import sys\nprint('the decoy ran', file=sys.stderr)\nsys.exit(3)\n"
    )
    monkeypatch.chdir(tmp_path)
    failure = worker_launcher.run_group(str(tmp_path / "no-spec.json"), 1)
    assert "decoy" not in failure and "cannot read the worker spec" in failure


STAND_IN_WORKER = """
import time
print("ready", flush=True)
time.sleep(600)
"""
# A trainer process: the launcher with two stand-in workers, under the CLI's SIGTERM handling.
LAUNCHER = """
import logging, sys
from components.worker_launcher import run_group
from pipeline.cli import sigterm_exits
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
with sigterm_exits():
    run_group("spec.json", 2, worker_module="stand_in_worker")
"""


def _running(pid):
    """Whether a process exists and is not a zombie (/proc/PID/stat's state field)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def launcher_with_two_workers(tmp_path):
    """A launcher process whose two workers have started; yields (launcher, worker pids)."""
    (tmp_path / "stand_in_worker.py").write_text(STAND_IN_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pids, ready = [], 0
    for line in launcher.stdout:
        if "started worker-" in line:
            pids.append(int(line.rsplit("pid ", 1)[1]))
        ready += line.startswith("[worker-") and line.rstrip().endswith("ready")
        if ready == 2:
            break
    try:
        assert len(pids) == 2 and all(_running(pid) for pid in pids)
        yield launcher, pids
    finally:
        for pid in [launcher.pid, *pids]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
@pytest.mark.timeout(120)
def test_sigterm_to_the_trainer_stops_its_local_workers(launcher_with_two_workers):
    launcher, pids = launcher_with_two_workers
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM  # SystemExit, after the cleanup
    assert [pid for pid in pids if _running(pid)] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.timeout(120)
def test_local_workers_die_with_a_killed_trainer(launcher_with_two_workers):
    launcher, pids = launcher_with_two_workers
    launcher.kill()  # no cleanup runs: the kernel must stop the workers
    launcher.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if _running(pid)] == []


def test_the_cli_turns_sigterm_into_system_exit_while_a_command_runs(monkeypatch):
    """`stn-pipeline` handles SIGTERM only while a command runs, and gives the handler back."""
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        except SystemExit as stop:
            seen["code"] = stop.code
        return 0

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=command)
    assert cli.main([]) == 0
    assert seen == {"code": 128 + signal.SIGTERM}
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_worker_without_an_index_says_where_it_comes_from():
    assert worker_index(None, {"JOB_COMPLETION_INDEX": "3"}) == 3
    assert worker_index(1, {"JOB_COMPLETION_INDEX": "3"}) == 1
    for environ in ({}, {"JOB_COMPLETION_INDEX": "-1"}):
        with pytest.raises(ValueError, match="pass --index or set JOB_COMPLETION_INDEX"):
            worker_index(None, environ)


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


def test_worker_records_shard_by_data_into_disjoint_complete_even_shards(tmp_path):
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
        # records 0, 2, 4, ... and 1, 3, 5, ... of the files in order: equal shards, even
        # when the files do not split evenly between the workers (3 files, 2 workers)
        assert parts == [whole[0::2], whole[1::2]]
    with pytest.raises(ValueError, match="no files match"):
        shard(tmp_path / "none", 2, 0)


def test_worker_records_read_the_files_in_name_order(tmp_path):
    # Each worker is a process of its own (its own string hash seed): all must list the files
    # in one order, or their shards overlap. File f of 8 holds the one record labelled f.
    write_examples(tmp_path, count=8, files=8)
    records = worker_records(
        [str(tmp_path / "Split-train" / "*")], tf.distribute.InputContext(1, 0)
    )
    labels = [
        tf.train.Example.FromString(r.numpy()).features.feature["label"].int64_list.value[0]
        for r in records
    ]
    assert labels == list(range(8))


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
    with pytest.raises(ValueError, match="mixed_precision must be true or false, got 'false'"):
        MultiWorkerConfig.from_dict({"mixed_precision": "false"})
    with pytest.raises(ValueError, match="needs the 'kubernetes' settings"):
        MultiWorkerConfig(backend="kubernetes")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['workers'\]"):
        MultiWorkerConfig.from_dict({"workers": 2})
    with pytest.raises(ValueError, match=r"kubernetes\.pvc"):
        MultiWorkerConfig.from_dict(
            {
                "backend": "kubernetes",
                "kubernetes": {
                    "image": "i",
                    "pvc": "",
                    "mount_path": "/m",
                    "cpu": "1",
                    "memory": "1G",
                },
            }
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


def test_workers_warm_start_from_a_copy_on_the_pipeline_root(tmp_path, monkeypatch):
    """On Kubernetes the pushed models are a claim the workers do not mount (k8s/base): the
    watcher's warm-start model must reach them through the pipeline root."""
    pushed = tmp_path / "serving" / "stn" / "3"
    (pushed / "variables").mkdir(parents=True)
    (pushed / "variables" / "variables.index").write_bytes(b"weights")
    seen = {}

    def workers(spec_path, num_workers, max_restarts, backup_dir):
        spec = json.loads(Path(spec_path).read_text())
        seen.update(json.loads(spec["exec_properties"]["custom_config"]))
        (tmp_path / "model" / "Format-Serving").mkdir(parents=True)

    monkeypatch.setattr(worker_launcher, "run_local", workers)
    examples = write_examples(tmp_path / "examples", count=4)
    model_run, _ = run_executor(
        tmp_path, examples, MultiWorkerConfig(), steps=1, warm_start_model=str(pushed)
    )
    copy = Path(seen["warm_start_model"])
    assert copy.is_relative_to(model_run)
    assert (copy / "variables" / "variables.index").read_bytes() == b"weights"


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
        ("unschedulable_grace_s", 0, "kubernetes.unschedulable_grace_s must be an integer >= 1"),
        ("tolerations", {"key": "x"}, "kubernetes.tolerations must be a list"),
        ("cpu", "two", "kubernetes.cpu must be a positive Kubernetes quantity"),
        ("cpu", 2, "kubernetes.cpu must be a positive Kubernetes quantity"),
        ("cpu", "0", "kubernetes.cpu must be a positive Kubernetes quantity"),
        ("memory", "6 GB", "kubernetes.memory must be a positive Kubernetes quantity"),
        ("memory", None, "kubernetes.memory must be a positive Kubernetes quantity"),
        ("namespace", "", "kubernetes.namespace must be a non-empty string"),
        ("node_selector", {"gpu": True}, "kubernetes.node_selector must map label names to"),
    ],
)
def test_kubernetes_settings_name_the_bad_field(field, value, message):
    with pytest.raises(ValueError) as error:
        dataclasses.replace(K8S, **{field: value})
    assert str(error.value).startswith(message)


def test_kubernetes_settings_need_cpu_and_memory():
    settings = {"image": "i:1", "pvc": "p", "mount_path": "/m"}
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['cpu', 'memory'\]"):
        MultiWorkerConfig.from_dict({"backend": "kubernetes", "kubernetes": settings})
    config = MultiWorkerConfig.from_dict(
        {"backend": "kubernetes", "kubernetes": {**settings, "cpu": "500m", "memory": "1.5Gi"}}
    )
    assert (config.kubernetes.cpu, config.kubernetes.memory) == ("500m", "1.5Gi")


def test_kubernetes_settings_must_be_a_mapping():
    with pytest.raises(ValueError, match=r"^multiworker.kubernetes must be a mapping, got 3$"):
        MultiWorkerConfig.from_dict({"backend": "kubernetes", "kubernetes": 3})


OWNER = {"apiVersion": "v1", "kind": "Pod", "name": "stn-retrain-1-x", "uid": "u-pod"}


def test_kubernetes_objects_validate_against_the_kubernetes_1_30_schemas():
    service = build_service("stn-trainer-1", K8S_CONFIG, "stn")
    job = build_job("stn-trainer-1", SPEC, K8S_CONFIG, "stn", OWNER)
    for doc in (service, job):
        kubernetes_validate.validate(doc, "1.30", strict=True)
        assert doc["metadata"]["namespace"] == "stn"
    assert job["metadata"]["ownerReferences"] == [OWNER]
    assert "ownerReferences" not in service["metadata"]
    pod = job["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 6 and pod["restartPolicy"] == "OnFailure"
    assert job["spec"]["activeDeadlineSeconds"] == 5 * 3600  # poll_timeout_s
    assert job["spec"]["ttlSecondsAfterFinished"] == 24 * 3600
    expected = {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert worker["resources"] == {"requests": expected, "limits": expected}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert worker["securityContext"]["readOnlyRootFilesystem"] is True
    # a failed worker's terminated state carries its last log lines, which the error quotes
    assert worker["terminationMessagePolicy"] == "FallbackToLogsOnError"
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


def test_cpu_workers_get_guaranteed_resources():
    config = dataclasses.replace(
        K8S_CONFIG, kubernetes=dataclasses.replace(K8S, gpus_per_worker=0, cpu="500m")
    )
    [worker] = build_job("stn-trainer-1", SPEC, config, "stn")["spec"]["template"]["spec"][
        "containers"
    ]
    expected = {"cpu": "500m", "memory": "16Gi"}
    assert worker["resources"] == {"requests": expected, "limits": expected}


def test_the_workers_go_to_the_retraining_pods_namespace_and_belong_to_it():
    downward = {
        "STN_NAMESPACE": "stn",
        "STN_POD_NAME": OWNER["name"],
        "STN_POD_UID": OWNER["uid"],
    }
    unset = dataclasses.replace(K8S, namespace=None)
    assert k8s_backend.worker_namespace(unset, downward) == "stn"
    assert k8s_backend.worker_namespace(unset, {}) == "default"
    assert k8s_backend.worker_namespace(dataclasses.replace(K8S, namespace="ml"), downward) == "ml"
    assert k8s_backend.retraining_pod_owner("stn", downward) == OWNER
    # an owner must live in the dependent's namespace; outside a pod there is none
    assert k8s_backend.retraining_pod_owner("ml", downward) is None
    assert k8s_backend.retraining_pod_owner("default", {}) is None


class FakeApiServer(http.server.ThreadingHTTPServer):
    """A loopback stand-in for kube-apiserver: answers the calls the backend makes, as the
    real API does (JSON objects, watch events as JSON lines, plain-text logs), and records
    every request. `job_result` is 'Complete' or 'Failed', or None for a job that never ends.
    Each pod listing answers the next pod list of `pod_script` (the last one repeats; default:
    two pods that ended as the job did), and the job changes once per entry; the first log read
    of a pod in `waiting_logs` answers 400, as for a container waiting to start. The job's events
    are `job_events`: (type, reason, message)."""

    def __init__(self, job_result: str | None, pod_script=None, waiting_logs=(), job_events=()):
        super().__init__(("127.0.0.1", 0), _FakeApiHandler)
        self.job_result = job_result
        self.pod_script = pod_script
        self.waiting_logs = set(waiting_logs)
        self.job_events = list(job_events)
        self.pod_listings = 0
        self.log_reads = collections.Counter()
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
            script = self.server.pod_script
            statuses = [{"active": 2}] * len(script) if script else [{}, {"active": 2}]
            if self.server.job_result:
                statuses.append(_final_status(self.server.job_result))
            for status in statuses:
                event = {"type": "MODIFIED", "object": {**job, "status": status}}
                self.wfile.write((json.dumps(event) + "\n").encode())
            return None
        if path.endswith("/pods"):
            name = job["metadata"]["name"]
            assert query["labelSelector"] == f"stn-pipeline/job={name}"
            return self._send(
                200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": self._pods()}
            )
        if path.endswith("/events"):
            assert query["fieldSelector"] == f"involvedObject.uid={job['metadata']['uid']}"
            items = [_event(job, *event) for event in self.server.job_events]
            return self._send(200, {"apiVersion": "v1", "kind": "EventList", "items": items})
        if path.endswith("/log"):
            pod = path.split("/")[-2]
            self.server.log_reads[pod] += 1
            reads = self.server.log_reads[pod]
            if pod in self.server.waiting_logs and reads == 1:
                return self._send(400, _status(400, "BadRequest"))
            return self._send(
                200, f"{pod} starts\n{pod} trained\n{pod} read {reads}\n", "text/plain"
            )
        return self._send(404, _status(404, "NotFound"))

    def _pods(self):
        script = self.server.pod_script
        if script is None:
            name = self.server.created["Job"]["metadata"]["name"]
            return [_pod(name, i, self.server.job_result) for i in range(2)]
        listing = min(self.server.pod_listings, len(script) - 1)
        self.server.pod_listings += 1
        return script[listing]


def _event(job, event_type, reason, message):
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{job['metadata']['name']}.{reason}", "namespace": "default"},
        "involvedObject": {"kind": "Job", "name": job["metadata"]["name"], "uid": "u-1"},
        "type": event_type,
        "reason": reason,
        "message": message,
    }


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
    """Worker pod `index` of a job that ended with `result`; worker 1 failed in a failed job."""
    failed = result == "Failed" and index == 1
    terminated = {
        "exitCode": 1 if failed else 0,
        "reason": "Error" if failed else "Completed",
        # the end of its log, as the kubelet sets it under FallbackToLogsOnError
        "message": "ValueError: no files match the patterns" if failed else None,
        "startedAt": "2026-11-25T14:01:00Z",
        # before its peer finished: a worker failing after that is another error
        "finishedAt": f"2026-11-25T14:0{3 if failed else 4}:00Z",
    }
    return worker_pod(
        index, "Failed" if failed else "Succeeded", {"terminated": terminated}, 6 if failed else 0
    )


RUNNING = {"running": {"startedAt": "2026-11-25T14:01:00Z"}}
DONE = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": "2026-11-25T14:01:00Z"}}
UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
}


def waiting(reason, message=None):
    return {"waiting": {"reason": reason, "message": message}}


def worker_pod(
    index, phase, state=None, restarts=0, conditions=(), job_name="stn-trainer-1", last_state=None
):
    """A worker pod of the job as the API server returns it (the worker container in `state`,
    its previous run in `last_state`)."""
    status = {"phase": phase, "conditions": list(conditions)}
    if state:
        status["containerStatuses"] = [
            {
                "name": "worker",
                "ready": "running" in state,
                "restartCount": restarts,
                "image": K8S.image,
                "imageID": "",
                "state": state,
                "lastState": last_state or {},
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job_name}-{index}-x7k{index}",
            "namespace": "default",
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "status": status,
    }


def as_model(pod):
    """The kubernetes client's V1Pod of a pod dict, deserialized as the client does."""
    response = types.SimpleNamespace(data=json.dumps(pod))
    return kubernetes.client.ApiClient().deserialize(response, "V1Pod")


@contextlib.contextmanager
def serving(server):
    """`server` answering in a thread until the block ends."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def outside_a_pod(monkeypatch):
    """A trainer that does not run in a pod (no downward API variables)."""
    for variable in ("STN_NAMESPACE", "STN_POD_NAME", "STN_POD_UID"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def fake_apiserver(request, outside_a_pod):
    """A FakeApiServer of `job_result` (or of keyword arguments), for a trainer outside a pod."""
    param = request.param
    arguments = param if isinstance(param, dict) else {"job_result": param}
    with serving(FakeApiServer(**arguments)) as server:
        yield server


def _api_client(server):
    configuration = kubernetes.client.Configuration()
    configuration.host = server.url()
    return kubernetes.client.ApiClient(configuration)


def group_failure(server, config=K8S_CONFIG):
    """What the WorkerGroupError of a run against the fake API `server` says."""
    with pytest.raises(WorkerGroupError) as failure:
        run_on_kubernetes("stn-trainer-1", SPEC, config, _api_client(server))
    return str(failure.value)


@pytest.mark.parametrize("fake_apiserver", ["Complete"], indirect=True)
def test_kubernetes_backend_creates_watches_streams_and_deletes(fake_apiserver, caplog):
    caplog.set_level(logging.INFO, logger="components.k8s_backend")
    run_on_kubernetes("stn-trainer-1", SPEC, K8S_CONFIG, _api_client(fake_apiserver))

    calls = [(method, path) for method, path, _, _ in fake_apiserver.requests]
    base = "/api/v1/namespaces/default"
    jobs = "/apis/batch/v1/namespaces/default/jobs"
    assert calls[:3] == [("POST", jobs), ("POST", f"{base}/services"), ("GET", jobs)]
    assert calls[-2:] == [
        ("DELETE", f"{jobs}/stn-trainer-1"),
        ("DELETE", f"{base}/services/stn-trainer-1"),
    ]
    posted = {path: body for method, path, _, body in fake_apiserver.requests if method == "POST"}
    assert posted[jobs] == build_job("stn-trainer-1", SPEC, K8S_CONFIG, "default")
    # the Service belongs to the Job the server created (its uid), so it goes with the Job
    job_owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "stn-trainer-1", "uid": "u-1"}
    assert posted[f"{base}/services"] == build_service(
        "stn-trainer-1", K8S_CONFIG, "default", job_owner
    )
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
    text = group_failure(fake_apiserver)
    assert "BackoffLimitExceeded" in text
    assert "stn-trainer-1-1-x7k1: exit code 1 (Error): ValueError: no files match" in text
    deletes = [p for m, p, _, _ in fake_apiserver.requests if m == "DELETE"]
    assert len(deletes) == 2


BAD_IMAGE = (
    'couldn\'t parse image reference "registry.example/stn-pipeline:0.1 ": invalid reference format'
)


@pytest.mark.parametrize(
    "fake_apiserver",
    [
        {
            "job_result": None,
            "pod_script": [
                [
                    worker_pod(0, "Pending", waiting("InvalidImageName", BAD_IMAGE)),
                    worker_pod(1, "Running", RUNNING),
                ]
            ],
        }
    ],
    indirect=True,
)
@pytest.mark.timeout(60)  # without the check, the trainer would wait for poll_timeout_s
def test_a_worker_that_cannot_start_fails_the_group_at_once(fake_apiserver):
    assert group_failure(fake_apiserver) == (
        "worker pod default/stn-trainer-1-0-x7k0 cannot start: InvalidImageName: "
        f"{BAD_IMAGE} (image {K8S.image})"
    )
    deletes = [p for m, p, _, _ in fake_apiserver.requests if m == "DELETE"]
    assert len(deletes) == 2


@pytest.mark.parametrize(
    "fake_apiserver",
    [
        {
            "job_result": "Complete",
            "pod_script": [
                [
                    worker_pod(0, "Pending", waiting("ContainerCreating")),
                    worker_pod(1, "Running", RUNNING),
                ],
                [worker_pod(0, "Running", RUNNING), worker_pod(1, "Running", RUNNING)],
                [worker_pod(0, "Running", RUNNING), worker_pod(1, "Running", RUNNING, 1)],
                [worker_pod(0, "Succeeded", DONE), worker_pod(1, "Succeeded", DONE, 1)],
            ],
            "waiting_logs": ["stn-trainer-1-0-x7k0"],
        }
    ],
    indirect=True,
)
def test_logs_are_followed_again_after_a_restart_and_after_a_waiting_container(
    fake_apiserver, caplog
):
    caplog.set_level(logging.INFO, logger="components.k8s_backend")
    run_on_kubernetes("stn-trainer-1", SPEC, K8S_CONFIG, _api_client(fake_apiserver))
    messages = [r.getMessage() for r in caplog.records]
    pending = f"worker pod stn-trainer-1-0-x7k0 is waiting: ContainerCreating: (image {K8S.image})"
    assert pending in messages
    # worker 1 ran twice: both runs were followed; worker 0's first read found it waiting
    assert fake_apiserver.log_reads == {"stn-trainer-1-0-x7k0": 2, "stn-trainer-1-1-x7k1": 2}
    for line in (
        "[worker-1] stn-trainer-1-1-x7k1 read 1",
        "[worker-1] stn-trainer-1-1-x7k1 read 2",
        "[worker-0] stn-trainer-1-0-x7k0 read 2",
    ):
        assert line in messages


FAILED_CREATE = (
    "FailedCreate",
    'Error creating: pods "stn-trainer-1-0-" is forbidden: error looking up service account '
    'default/stn-worker: serviceaccount "stn-worker" not found',
)
REFUSED_PODS = {"job_result": None, "pod_script": [[]], "job_events": [("Warning", *FAILED_CREATE)]}
GIVES_UP_AT_ONCE = dataclasses.replace(
    K8S_CONFIG, kubernetes=dataclasses.replace(K8S, unschedulable_grace_s=1, poll_timeout_s=30)
)


@pytest.mark.parametrize("fake_apiserver", [REFUSED_PODS], indirect=True)
def test_worker_pods_the_api_server_refuses_fail_the_group_with_the_jobs_event(
    fake_apiserver, caplog
):
    caplog.set_level(logging.INFO, logger="components.k8s_backend")
    assert group_failure(fake_apiserver, GIVES_UP_AT_ONCE) == (
        "the workers' job in default has 0 of 2 pods after 1 s: " + ": ".join(FAILED_CREATE)
    )
    logged = "the workers' job cannot create a pod: " + ": ".join(FAILED_CREATE)
    assert [r.getMessage() for r in caplog.records].count(logged + "; giving up after 1 s") == 1
    deletes = [p for m, p, _, _ in fake_apiserver.requests if m == "DELETE"]
    assert len(deletes) == 2


def test_missing_pods_fail_the_group_only_after_the_grace_period():
    warnings = []
    watch = k8s_backend._StartupWatch(
        "stn", unschedulable_grace_s=600, expected_pods=2, job_warnings=lambda: warnings
    )
    one = [as_model(worker_pod(0, "Running", RUNNING))]
    watch.check(one, now=1000.0)
    watch.check(one, now=1599.0)
    watch.check([*one, as_model(worker_pod(1, "Running", RUNNING))], now=1700.0)  # it came
    watch.check(one, now=1800.0)  # gone again (evicted): a new grace period
    warnings.append(("FailedCreate", "exceeded quota: stn-quota"))
    with pytest.raises(WorkerGroupError, match="has 1 of 2 pods after 600 s: FailedCreate: exc"):
        watch.check(one, now=2400.0)


def test_an_unschedulable_worker_fails_the_group_after_the_grace_period(caplog):
    caplog.set_level(logging.INFO, logger="components.k8s_backend")
    watch = k8s_backend._StartupWatch("stn", unschedulable_grace_s=600)
    pending = as_model(worker_pod(1, "Pending", conditions=[UNSCHEDULABLE]))
    running = as_model(worker_pod(0, "Running", RUNNING))
    watch.check([running, pending], now=1000.0)
    watch.check([running, pending], now=1599.0)
    assert [r.getMessage() for r in caplog.records] == [
        "worker pod stn-trainer-1-1-x7k1 is waiting: Unschedulable: 0/3 nodes are available: "
        "3 Insufficient nvidia.com/gpu.; giving up after 600 s"
    ]
    with pytest.raises(WorkerGroupError) as failure:
        watch.check([running, pending], now=1600.0)
    assert str(failure.value) == (
        "worker pod stn/stn-trainer-1-1-x7k1 cannot start: Unschedulable: "
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    )


def test_a_failing_image_pull_gets_a_grace_period_across_its_retries():
    watch = k8s_backend._StartupWatch("stn", unschedulable_grace_s=600)
    grace = k8s_backend.RETRY_GRACE_S

    def pulling(reason):
        return [as_model(worker_pod(0, "Pending", waiting(reason, "manifest unknown")))]

    watch.check(pulling("ErrImagePull"), now=0.0)
    watch.check(pulling("ImagePullBackOff"), now=grace - 1)  # the kubelet's retries alternate
    watch.check([as_model(worker_pod(0, "Running", RUNNING))], now=grace)  # the pull worked
    watch.check(pulling("ErrImagePull"), now=grace + 1)  # a new problem: a new grace period
    with pytest.raises(WorkerGroupError, match="ImagePullBackOff: manifest unknown"):
        watch.check(pulling("ImagePullBackOff"), now=2 * grace + 1)


def _permission(method, path, query):
    """The RBAC (API group, resource, verb) a request to the API server needs."""
    parts = path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[parts.index("namespaces") + 2 :]
    resource = "/".join(rest[::2])  # pods/NAME/log is the subresource pods/log
    if method in ("POST", "DELETE"):
        return group, resource, {"POST": "create", "DELETE": "delete"}[method]
    if query.get("watch", "").lower() == "true":
        return group, resource, "watch"
    return group, resource, "get" if len(rest) > 1 else "list"


def role_permissions():
    """What the trainer's Role in k8s/base/rbac.yaml grants: (API group, resource, verb)."""
    docs = yaml.safe_load_all((REPO / "k8s" / "base" / "rbac.yaml").read_text())
    [role] = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "stn-trainer"]
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_trainers_role_grants_exactly_the_calls_the_backend_makes(outside_a_pod):
    used = set()
    for server, config in (
        (FakeApiServer("Failed"), K8S_CONFIG),  # pods that ran: their logs
        (FakeApiServer(**REFUSED_PODS), GIVES_UP_AT_ONCE),  # no pods: the job's events
    ):
        with serving(server), pytest.raises(WorkerGroupError):
            run_on_kubernetes("stn-trainer-1", SPEC, config, _api_client(server))
        used |= {_permission(m, p, q) for m, p, q, _ in server.requests}
    assert {("", "pods/log", "get"), ("batch", "jobs", "watch"), ("", "events", "list")} <= used
    assert used == role_permissions()


def test_kubernetes_backend_needs_the_spec_on_the_shared_volume():
    with pytest.raises(ValueError, match="mount_path"):
        run_on_kubernetes("stn-trainer-1", "/tmp/spec.json", K8S_CONFIG, api_client=object())


def ended(exit_code, finished_at, message=None):
    """A terminated container state that ended at `finished_at` (HH:MM on the test's day)."""
    reason = "Error" if exit_code else "Completed"
    stamp = f"2026-11-25T14:{finished_at}:00Z"
    return {
        "terminated": {
            "exitCode": exit_code,
            "reason": reason,
            "message": message,
            "startedAt": "2026-11-25T14:01:00Z",
            "finishedAt": stamp,
        }
    }


DISK_FULL = "OSError: [Errno 28] No space left on device"


@pytest.mark.parametrize(
    "fake_apiserver",
    [
        {
            "job_result": None,
            "pod_script": [
                [worker_pod(0, "Running", RUNNING), worker_pod(1, "Running", RUNNING)],
                # Worker 1 finished at 14:04; the chief failed writing the export at 14:05 and
                # runs again, waiting for worker 1's collectives.
                [
                    worker_pod(0, "Running", RUNNING, 1, last_state=ended(1, "05", DISK_FULL)),
                    worker_pod(1, "Succeeded", ended(0, "04")),
                ],
            ],
        }
    ],
    indirect=True,
)
@pytest.mark.timeout(60)  # without the check, the trainer would wait for poll_timeout_s
def test_a_worker_that_fails_after_a_peer_finished_fails_the_group(fake_apiserver):
    assert group_failure(fake_apiserver) == (
        "worker pod stn-trainer-1-0-x7k0 failed (exit code 1, Error) after a peer had finished, "
        f"so it cannot resume: {DISK_FULL}"
    )


@pytest.mark.parametrize(
    "fake_apiserver",
    [
        {
            "job_result": "Failed",
            "pod_script": [
                [
                    worker_pod(0, "Running", RUNNING),
                    worker_pod(
                        1, "Running", RUNNING, 1, last_state=ended(1, "03", "OOM in step 7")
                    ),
                ],
                [],  # the Job failed for good: Kubernetes terminated its pods
            ],
        }
    ],
    indirect=True,
)
def test_a_failure_seen_before_the_jobs_pods_were_removed_is_reported(fake_apiserver):
    text = group_failure(fake_apiserver)
    assert text.endswith("stn-trainer-1-1-x7k1: exit code 1 (Error): OOM in step 7")
    assert "(no failed container seen)" not in text


def test_workers_that_failed_before_any_peer_finished_are_not_stranded():
    # Both failed at 14:03 and ran again together; then both finished: a normal recovery.
    pods = [
        worker_pod(i, "Succeeded", ended(0, f"0{4 + i}"), 1, last_state=ended(1, "03"))
        for i in range(2)
    ]
    assert _stranded_worker([as_model(pod) for pod in pods]) is None
    pods[1] = worker_pod(1, "Running", RUNNING, 2, last_state=ended(1, "06"))
    assert "stn-trainer-1-1-x7k1 failed" in _stranded_worker([as_model(pod) for pod in pods])


def test_a_worker_that_fails_in_the_second_a_peer_finished_is_stranded():
    # The API's timestamps are whole seconds: the chief failing its export a moment after
    # worker 1 finished carries the same time.
    pods = [
        worker_pod(0, "Running", RUNNING, 1, last_state=ended(1, "04", DISK_FULL)),
        worker_pod(1, "Succeeded", ended(0, "04")),
    ]
    assert "stn-trainer-1-0-x7k0 failed" in _stranded_worker([as_model(pod) for pod in pods])


@pytest.mark.parametrize("minute", ["04", "05"])  # the second worker 1 finished counts too
def test_a_worker_pod_made_anew_after_a_peer_finished_is_stranded(minute):
    # The chief's node went away after worker 1 finished; the Job made a new chief pod.
    started = {"running": {"startedAt": f"2026-11-25T14:{minute}:00Z"}}
    pods = [worker_pod(0, "Running", started), worker_pod(1, "Succeeded", ended(0, "04"))]
    assert _stranded_worker([as_model(pod) for pod in pods]) == (
        "worker pod stn-trainer-1-0-x7k0 started after a peer had finished, so it cannot resume"
    )


def test_a_worker_is_stranded_by_the_first_peer_that_finished_not_the_last():
    # Worker 1 finished at 14:04; the chief failed at 14:05 and runs again, waiting for worker
    # 1's collectives; worker 2 finished its own work at 14:06.
    pods = [
        worker_pod(
            0,
            "Running",
            {"running": {"startedAt": "2026-11-25T14:05:00Z"}},
            1,
            last_state=ended(1, "05"),
        ),
        worker_pod(1, "Succeeded", ended(0, "04")),
        worker_pod(2, "Succeeded", ended(0, "06")),
    ]
    assert "stn-trainer-1-0-x7k0 failed" in _stranded_worker([as_model(pod) for pod in pods])
