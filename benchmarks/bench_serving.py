"""Load test of `stn-pipeline serve` over loopback: requests/s and latency at batch 1 and 32.

The server runs as its own process (`python -m pipeline.cli serve`), as in production; a few
client threads here send TF Serving REST predict requests over keep-alive connections, each
phase bounded by a request count and a time limit. The baseline is the same SavedModel
signature called in this process without HTTP, so the ratio is what the server costs.
By default the model is the linear stand-in with the serving contract
(pipeline/linear_savedmodel.py); `--home` serves a model the pipeline pushed instead.

    .venv/bin/python benchmarks/bench_serving.py [--clients 4] [--requests 200] [--seconds 15]
        [--rounds 5] [--home DIR]
"""

import argparse
import base64
import dataclasses
import functools
import http.client
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from _util import peak_rss_mib, print_table
from PIL import Image

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_pngs(count, size=42, seed=0):
    rng = np.random.default_rng(seed)
    pngs = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs


def push_linear_model(home, model_name):
    from pipeline.linear_savedmodel import NUM_PIXELS, save_linear_classifier

    rng = np.random.default_rng(0)
    save_linear_classifier(
        os.path.join(home, "serving", model_name, "1"),
        rng.normal(0, 0.05, (NUM_PIXELS, 10)),
        np.zeros(10),
    )


def start_server(home, model_name):
    """Start `stn-pipeline serve` on a free port; return (process, port) once it listens."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "serve",
            "--home",
            home,
            "--port",
            "0",
            "--model-name",
            model_name,
        ],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:
        if "listening on" in line:
            port = int(line.split("listening on http://")[1].split("/")[0].rsplit(":", 1)[1])
            threading.Thread(target=process.stderr.read, daemon=True).start()  # drain the log
            return process, port
    raise RuntimeError(f"the server exited with {process.wait()} before listening")


@dataclasses.dataclass
class Phase:
    """One measured phase: `latencies` of the successful requests, in seconds."""

    name: str
    batch: int
    clients: int
    latencies: np.ndarray
    wall_seconds: float
    errors: int = 0

    @classmethod
    def merge(cls, parts):
        """One phase from slices of the same phase."""
        first = parts[0]
        return cls(
            first.name,
            first.batch,
            first.clients,
            np.concatenate([part.latencies for part in parts]),
            sum(part.wall_seconds for part in parts),
            sum(part.errors for part in parts),
        )

    @property
    def requests_per_second(self):
        return len(self.latencies) / self.wall_seconds


def http_phase(port, path, body, batch, clients, max_requests, max_seconds):
    """Up to `max_requests` predict requests from `clients` threads, within `max_seconds`."""
    latencies, errors = [], []
    remaining = iter(range(max_requests))
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": "application/json"}
        while time.perf_counter() < deadline:
            with lock:
                if next(remaining, None) is None:
                    break
            started = time.perf_counter()
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                (latencies if response.status == 200 else errors).append(elapsed)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return Phase("HTTP server", batch, clients, np.array(latencies), wall, len(errors))


def direct_phase(signature, images, max_requests, max_seconds):
    """The baseline: the signature called in this process, one batch after another."""
    import tensorflow as tf

    tensor = tf.constant(images)
    latencies = []
    deadline = time.perf_counter() + max_seconds
    started = time.perf_counter()
    while len(latencies) < max_requests and time.perf_counter() < deadline:
        begin = time.perf_counter()
        signature(images=tensor)["probabilities"].numpy()
        latencies.append(time.perf_counter() - begin)
    wall = time.perf_counter() - started
    return Phase("direct call (baseline)", len(images), 1, np.array(latencies), wall)


def measure(signature, port, model_name, args):
    """The baseline and the HTTP phases at batch 1 and 32.

    Each phase runs in `args.rounds` slices taken in turn with the others, so that a change
    in the machine's load during the run falls on all of them alike.
    """
    pngs = make_pngs(32)
    path = f"/v1/models/{model_name}:predict"
    requests, seconds = args.requests // args.rounds, args.seconds / args.rounds
    phases = []
    for batch in (1, 32):
        images = pngs[:batch]
        body = json.dumps(
            {"instances": [{"b64": base64.b64encode(png).decode()} for png in images]}
        ).encode()
        direct_phase(signature, images, 5, seconds)  # warm-up
        http_phase(port, path, body, batch, 1, 5, seconds)  # warm-up
        runs = [functools.partial(direct_phase, signature, images, requests, seconds)]
        runs += [
            functools.partial(http_phase, port, path, body, batch, clients, requests, seconds)
            for clients in sorted({1, args.clients})
        ]
        slices = [[run() for run in runs] for _ in range(args.rounds)]
        phases += [Phase.merge(parts) for parts in zip(*slices, strict=True)]
    return phases


HEADERS = ("path", "batch", "clients", "requests", "errors", "req/s", "images/s", "p50 ms",
           "p99 ms", "vs baseline")  # fmt: skip


def table_rows(phases):
    """One row per phase; `vs baseline` is its throughput over the direct call's, same batch."""
    baseline = {p.batch: p.requests_per_second for p in phases if p.name.startswith("direct")}
    return [
        (
            p.name,
            p.batch,
            p.clients,
            len(p.latencies),
            p.errors,
            p.requests_per_second,
            p.requests_per_second * p.batch,
            float(np.percentile(p.latencies, 50) * 1e3),
            float(np.percentile(p.latencies, 99) * 1e3),
            p.requests_per_second / baseline[p.batch],
        )
        for p in phases
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="serve <home>/serving/<model-name>/ (default: a stand-in)")
    parser.add_argument("--model-name", default="stn")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default: 4)")
    parser.add_argument("--requests", type=int, default=200, help="requests per phase at most")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per phase at most")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved slices per phase")
    args = parser.parse_args()
    if min(args.clients, args.rounds) < 1 or args.requests < args.rounds or args.seconds <= 0:
        parser.error("--clients, --rounds and --seconds must be positive, --requests >= --rounds")

    import tensorflow as tf

    from pipeline.model_repository import list_versions

    with tempfile.TemporaryDirectory() as scratch:
        home = args.home or scratch
        if args.home is None:
            push_linear_model(home, args.model_name)
        versions = list_versions(os.path.join(home, "serving", args.model_name))
        if not versions:
            raise SystemExit(f"no version under {home}/serving/{args.model_name}/")
        signature = tf.saved_model.load(versions[max(versions)]).signatures["serving_default"]
        process, port = start_server(home, args.model_name)
        try:
            phases = measure(signature, port, args.model_name, args)
        finally:
            process.terminate()
            process.wait()
    print(f"model: {versions[max(versions)]}" if args.home else "model: linear stand-in")
    print_table(HEADERS, table_rows(phases))
    server_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(f"peak RSS: server process {server_peak:.0f} MiB, benchmark {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
