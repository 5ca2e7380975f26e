"""The `local` backend: N worker processes on this machine, talking gRPC over loopback.

Each worker is `python -m components.multiworker_worker SPEC --cluster ... --index i` with
its own `TF_CONFIG` (a cluster of N free loopback ports). Every line a worker prints goes to
this process's log as `[worker-i] ...`. When a worker fails, the others are stopped and the
whole group starts again (new ports), up to `max_restarts` times; the Trainer module's
`BackupAndRestore` checkpoint lets training resume where the last checkpoint left it.

Workers never outlive the launcher: it stops them on the way out (`stn-pipeline` turns SIGTERM
into SystemExit), and on Linux the kernel kills them when the launcher dies without cleanup.
"""

import collections
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 25
WORKER_MODULE = "components.multiworker_worker"
_POLL_S = 0.2
_STOP_GRACE_S = 10
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class WorkerGroupError(RuntimeError):
    """The worker group failed more often than it may restart."""


def free_loopback_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free on 127.0.0.1 right now."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]


def checkpoint_step(backup_dir: str) -> int | None:
    """The training step saved in the latest BackupAndRestore checkpoint, None if there is none."""
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(os.path.join(backup_dir, "chief"))
    if latest is None:
        return None
    return int(
        tf.train.load_checkpoint(latest).get_tensor("train_counter/.ATTRIBUTES/VARIABLE_VALUE")
    )


def _die_with_launcher():
    """A `preexec_fn` that has Linux SIGKILL the worker when the launcher's thread that started
    it ends (the one waiting in `run_group`), even by SIGKILL; None elsewhere. It runs in the
    child between fork and exec, where Python is unsafe in a threaded process, so it does as
    little as it can: one prctl and one getppid, everything else looked up before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    launcher = os.getpid()
    kill = int(signal.SIGKILL)

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, kill)
        if os.getppid() != launcher:  # the launcher died before prctl took effect
            os._exit(1)

    return arm


class _Worker:
    """One worker process and the threads that copy its output into the log."""

    def __init__(self, index: int, command: list[str], env: dict[str, str]):
        self.index = index
        self.stderr_tail = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_launcher(),
        )
        log.info("[launcher] started worker-%d, pid %d", index, self.process.pid)
        self._readers = [
            threading.Thread(target=self._copy, args=(self.process.stdout, None), daemon=True),
            threading.Thread(
                target=self._copy, args=(self.process.stderr, self.stderr_tail), daemon=True
            ),
        ]
        for reader in self._readers:
            reader.start()

    def _copy(self, pipe, tail) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            log.info("[worker-%d] %s", self.index, line)
            if tail is not None:
                tail.append(line)
        pipe.close()

    def stop_by(self, deadline: float) -> None:
        """Wait until `deadline` (time.monotonic) for the process to end, then kill it; wait for
        its output to be copied."""
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("[launcher] worker-%d ignored SIGTERM; killing it", self.index)
            self.process.kill()
            self.process.wait()
        for reader in self._readers:
            reader.join()

    def failure(self) -> str:
        code = self.process.returncode
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code < 0
            else f"exited with code {code}"
        )
        tail = "\n".join(self.stderr_tail) or "(nothing)"
        return f"worker-{self.index} {how}; last lines of its stderr:\n{tail}"


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_USE_LEGACY_KERAS="1", PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ INFO lines are noise here
    # Every local worker sees every GPU, and TensorFlow would give the first to start almost
    # all of each GPU's memory: the others would fail to allocate.
    env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    return env


def run_group(spec_path: str, num_workers: int, worker_module: str = WORKER_MODULE) -> str | None:
    """Runs one group of workers (`python -m worker_module SPEC --cluster H --index I`) to the
    end; returns None on success, else the first failure. The workers stop when it returns or
    raises (SystemExit included); the failure is told once its output is copied, so the
    stderr lines it quotes end with the worker's last one."""
    hosts = ",".join(f"127.0.0.1:{port}" for port in free_loopback_ports(num_workers))
    log.info("[launcher] cluster: %s", hosts)
    # -P: the installed worker module, not one in the directory the trainer runs in.
    base = [sys.executable, "-P", "-m", worker_module, spec_path, "--cluster", hosts]
    env = _worker_env()
    workers = [_Worker(i, [*base, "--index", str(i)], env) for i in range(num_workers)]
    try:
        while True:
            codes = [w.process.poll() for w in workers]
            failed = [w for w, code in zip(workers, codes, strict=True) if code not in (None, 0)]
            if failed or all(code == 0 for code in codes):
                break
            time.sleep(_POLL_S)
    finally:
        _stop(workers)
    return failed[0].failure() if failed else None


def _stop(workers: list[_Worker]) -> None:
    """SIGTERM every running worker at once, then give them `_STOP_GRACE_S` together (TF workers
    may ignore SIGTERM, or hang in a collective that waits for a dead peer) before SIGKILL."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for worker in workers:
        worker.stop_by(deadline)


def run_local(spec_path: str, num_workers: int, max_restarts: int, backup_dir: str) -> None:
    """Trains with `num_workers` local workers, restarting the group after a failure."""
    for attempt in range(max_restarts + 1):
        if attempt:
            step = checkpoint_step(backup_dir)
            resume = "step 0 (no checkpoint yet)" if step is None else f"checkpoint step {step}"
            log.warning(
                "[launcher] restarting all %d workers (restart %d of %d); resuming from %s",
                num_workers,
                attempt,
                max_restarts,
                resume,
            )
        failure = run_group(spec_path, num_workers)
        if failure is None:
            return
        log.error("[launcher] %s", failure)
    raise WorkerGroupError(
        f"training failed after {max_restarts} restart(s) of {num_workers} workers: {failure}"
    )
