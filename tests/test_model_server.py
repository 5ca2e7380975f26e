"""The model server (`stn-pipeline serve`): a real server on loopback, real SavedModels.

The served model is a fixed linear classifier with the serving contract, so every answer is
checked against NumPy. Versions are pushed as TF Serving expects (copied, then renamed into
place) and, in one test, as TFX's Pusher does (saved_model.pb copied last).
"""

import base64
import http.client
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import tensorflow as tf
from PIL import Image

from pipeline import cli
from pipeline.linear_savedmodel import IMAGE_SIZE, NUM_PIXELS, save_linear_classifier
from pipeline.model_repository import ModelRepository, list_versions
from pipeline.model_server import ModelServer
from pipeline.predict_codec import RequestError, format_predict_response, parse_predict_request

NUM_CLASSES = 10
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two exported linear classifiers with different weights: name -> (path, weights, bias)."""
    out = tmp_path_factory.mktemp("exported")
    result = {}
    for name, seed in (("first", 1), ("second", 2)):
        rng = np.random.default_rng(seed)
        weights = rng.normal(0, 0.05, (NUM_PIXELS, NUM_CLASSES))
        bias = rng.normal(0, 0.1, NUM_CLASSES)
        save_linear_classifier(out / name, weights, bias)
        result[name] = (str(out / name), weights, bias)
    return result


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(7).integers(0, 256, (6, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)


@pytest.fixture(scope="module")
def pngs(pixels):
    return [encode_png(image) for image in pixels]


def encode_png(image):
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data):
    return {"b64": base64.b64encode(data).decode()}


def expected(pixels, model):
    """NumPy's answer of a linear classifier: (probabilities, classes)."""
    _, weights, bias = model
    logits = pixels.reshape(len(pixels), -1) / 255.0 @ weights + bias
    return scipy.special.softmax(logits, axis=1), logits.argmax(axis=1)


def push(model_dir, version, source):
    """Copy a SavedModel to a temporary name, then rename it into place (as pushers must)."""
    staging = os.path.join(model_dir, f".incoming-{version}")
    shutil.copytree(source, staging)
    os.rename(staging, os.path.join(model_dir, str(version)))


def push_broken(model_dir, version, content=b"not a SavedModel"):
    staging = os.path.join(model_dir, f".incoming-{version}")
    os.makedirs(staging)
    with open(os.path.join(staging, "saved_model.pb"), "wb") as handle:
        handle.write(content)
    os.rename(staging, os.path.join(model_dir, str(version)))


def call(url, payload=None, method=None, raw=None):
    """(HTTP status, decoded JSON body) of one request."""
    data = raw if raw is not None else None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_until(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def version_states(server):
    _, body = call(f"{server.url}/v1/models/stn")
    return {entry["version"]: entry for entry in body.get("model_version_status", [])}


def predict_classes(server, pngs):
    status, body = call(
        f"{server.url}/v1/models/stn:predict", {"instances": [b64(p) for p in pngs]}
    )
    assert status == 200, body
    return np.array([row["classes"] for row in body["predictions"]])


@pytest.fixture
def serving(tmp_path):
    """A running server polling an empty model directory every 0.1 s; yields (server, dir)."""
    model_dir = tmp_path / "serving" / "stn"
    model_dir.mkdir(parents=True)
    server = ModelServer(
        ModelRepository(str(tmp_path / "serving"), "stn"), poll_seconds=0.1, max_request_bytes=2**20
    )
    server.start()
    yield server, str(model_dir)
    server.stop()


@pytest.fixture(scope="module")
def served_first(tmp_path_factory, models):
    """A running server with the `first` model as version 1 (for requests that change nothing)."""
    base = tmp_path_factory.mktemp("home") / "serving"
    (base / "stn").mkdir(parents=True)
    push(str(base / "stn"), 1, models["first"][0])
    repository = ModelRepository(str(base), "stn")
    repository.poll()
    server = ModelServer(
        repository, poll_seconds=0.1, max_request_bytes=2**20, request_timeout_seconds=1.0
    )
    server.start()
    yield server
    server.stop()


# --- predictions ----------------------------------------------------------------------------


def test_row_format_predictions_match_numpy(served_first, models, pixels, pngs):
    status, body = call(
        f"{served_first.url}/v1/models/stn:predict", {"instances": [b64(p) for p in pngs]}
    )
    assert status == 200, body
    probabilities, classes = expected(pixels, models["first"])
    rows = body["predictions"]
    assert len(rows) == len(pngs)
    assert all(set(row) == {"probabilities", "classes"} for row in rows)
    np.testing.assert_allclose([row["probabilities"] for row in rows], probabilities, atol=1e-5)
    np.testing.assert_array_equal([row["classes"] for row in rows], classes)


def test_named_rows_columns_and_version_path_agree(served_first, models, pixels, pngs):
    url = f"{served_first.url}/v1/models/stn"
    probabilities, classes = expected(pixels, models["first"])
    named_rows = {"instances": [{"images": b64(p)} for p in pngs]}
    status, body = call(f"{url}/versions/1:predict", named_rows)
    assert status == 200, body
    np.testing.assert_array_equal([row["classes"] for row in body["predictions"]], classes)
    for columns in ({"images": [b64(p) for p in pngs]}, [b64(p) for p in pngs]):
        status, body = call(f"{url}:predict", {"inputs": columns})
        assert status == 200, body
        assert set(body["outputs"]) == {"probabilities", "classes"}
        np.testing.assert_allclose(body["outputs"]["probabilities"], probabilities, atol=1e-5)
        np.testing.assert_array_equal(body["outputs"]["classes"], classes)


def test_rectify_signature_returns_the_decoded_images(served_first, pixels, pngs):
    request = {"signature_name": "rectify", "instances": [b64(pngs[0])]}
    status, body = call(f"{served_first.url}/v1/models/stn:predict", request)
    assert status == 200, body
    rectified = np.array(body["predictions"][0])  # a single output: rows are bare values
    np.testing.assert_allclose(rectified[..., 0], pixels[0] / 255.0, atol=1e-6)


def test_status_has_tf_servings_shape(served_first):
    available = {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert call(f"{served_first.url}/v1/models/stn") == (200, available)
    assert call(f"{served_first.url}/v1/models/stn/versions/1") == (200, available)
    status, body = call(f"{served_first.url}/v1/models/stn/versions/7")
    assert status == 404 and "version 7" in body["error"]


# --- bad requests ---------------------------------------------------------------------------


BAD_REQUESTS = [
    # (what, path suffix, raw body, expected status, words in the error)
    ("not JSON", ":predict", b"{instances: ", 400, "not valid JSON"),
    ("not UTF-8", ":predict", b"\xff\xfe", 400, "not valid JSON"),
    ("a JSON list", ":predict", b"[1, 2]", 400, "JSON object"),
    ("bad base64", ":predict", b'{"instances": [{"b64": "no*base64"}]}', 400, "invalid base64"),
    ("not an image", ":predict", b'{"instances": [{"b64": "aGVsbG8="}]}', 400, "image"),
    ("numbers for strings", ":predict", b'{"instances": [1, 2]}', 400, "string"),
    ("wrong top key", ":predict", b'{"instance": []}', 400, "unknown keys"),
    ("both keys", ":predict", b'{"instances": [], "inputs": []}', 400, "exactly one"),
    ("empty instances", ":predict", b'{"instances": []}', 400, "non-empty"),
    ("empty columns", ":predict", b'{"inputs": {"images": []}}', 400, "non-empty"),
    ("wrong input name", ":predict", b'{"instances": [{"img": {"b64": ""}}]}', 400, "img"),
    ("unknown signature", ":predict", b'{"signature_name": "x", "instances": [1]}', 400, "'x'"),
    ("nested batch", ":predict", b'{"inputs": [[{"b64": "aGk="}]]}', 400, "shape"),
    (
        "not a tf.Example",  # TensorFlow's error quotes the bytes, which are not UTF-8
        ":predict",
        b'{"signature_name": "serving_examples", "instances": [{"b64": "iVBORw0KGgo="}]}',
        400,
        "serving_examples",
    ),
    ("unknown verb", ":classify", b"{}", 405, "not supported"),
    ("version not served", "/versions/2:predict", b'{"instances": [1]}', 404, "stn, 2"),
]


@pytest.mark.parametrize(
    ("suffix", "raw", "code", "words"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_gets_4xx_and_server_stays_healthy(
    served_first, pngs, suffix, raw, code, words
):
    status, body = call(f"{served_first.url}/v1/models/stn{suffix}", raw=raw, method="POST")
    assert status == code, body
    assert words in body["error"]
    assert predict_classes(served_first, pngs[:1]).shape == (1,)


def test_unknown_model_and_path_are_404(served_first):
    status, body = call(f"{served_first.url}/v1/models/mnist:predict", {"instances": [1]})
    assert status == 404 and "mnist" in body["error"]
    assert call(f"{served_first.url}/v1/models/mnist")[0] == 404
    assert call(f"{served_first.url}/healthz")[0] == 404


def raw_exchange(server, request_bytes):
    """Send raw bytes, return everything the server answers until it closes the connection."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(request_bytes)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def unhandled(served_first, monkeypatch):
    """The errors that reach socketserver's handle_error, which prints them as tracebacks."""
    errors = []
    monkeypatch.setattr(served_first, "handle_error", lambda *args: errors.append(args))
    return errors


def connect(server, reset):
    """A connection to `server`; with `reset`, one that closes with a TCP reset, not a FIN."""
    connection = socket.create_connection(server.server_address[:2])
    if reset:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return connection


def assert_served_on_quietly(server, pngs, unhandled, caplog):
    """No traceback and no warning was logged, and the server still answers."""
    assert unhandled == []
    assert all(record.levelno < logging.WARNING for record in caplog.records), caplog.text
    assert predict_classes(server, pngs[:1]).shape == (1,)


@pytest.mark.parametrize("reset", [False, True])
def test_a_client_that_leaves_mid_body_is_a_log_line_not_a_traceback(
    served_first, pngs, unhandled, caplog, reset
):
    with caplog.at_level(logging.DEBUG, logger="pipeline.model_server"):
        with connect(served_first, reset) as connection:
            connection.sendall(
                b"POST /v1/models/stn:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000"
                b"\r\n\r\n0123456789"
            )
        # Reset: the body's read fails. Closed: the 400 for the short body is sent (and its
        # write fails when the client's reset has come back by then).
        noticed = "closed the connection" if reset else '" 400 '
        wait_until(lambda: noticed in caplog.text, "the server to notice")
        time.sleep(0.2)  # for the answer's writes to end
    assert_served_on_quietly(served_first, pngs, unhandled, caplog)


@pytest.mark.parametrize("answered", [False, True])
def test_a_client_that_resets_mid_headers_or_between_requests_is_no_traceback(
    served_first, pngs, unhandled, caplog, answered
):
    with caplog.at_level(logging.DEBUG, logger="pipeline.model_server"):
        connection = connect(served_first, reset=True)
        connection.sendall(b"GET /v1/models/stn HTTP/1.1\r\nHost: x\r\n")
        if answered:  # the request ends and is answered; the kept-alive connection idles
            connection.sendall(b"\r\n")
            wait_until(lambda: '" 200 ' in caplog.text, "the answer")
        time.sleep(0.2)  # the server waits for more of the request (or the next one)
        connection.close()  # a TCP reset
        time.sleep(0.5)  # for the server to read it
    assert_served_on_quietly(served_first, pngs, unhandled, caplog)


def test_oversized_request_is_refused_before_its_body_is_sent(served_first, pngs):
    # The server must answer 413 on the header alone and close: the body never comes.
    answer = raw_exchange(
        served_first,
        b"POST /v1/models/stn:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "exceeds the limit of 1048576" in json.loads(body)["error"]
    assert predict_classes(served_first, pngs[:1]).shape == (1,)


def test_request_without_length_is_refused(served_first):
    answer = raw_exchange(
        served_first, b"POST /v1/models/stn:predict HTTP/1.1\r\nHost: x\r\n\r\n{}"
    )
    assert answer.startswith(b"HTTP/1.1 411")


def test_stalled_body_times_out_with_408(served_first, pngs):
    answer = raw_exchange(
        served_first,
        b"POST /v1/models/stn:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
    )
    assert answer.startswith(b"HTTP/1.1 408")
    assert predict_classes(served_first, pngs[:1]).shape == (1,)


def trickle(server, head, drip, seconds=5.0):
    """The server's answer (b"closed" if it closed, b"" if neither within `seconds`) to `head`,
    then a byte of `drip` every 0.25 s (each byte well within the 1 s timeout)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(head)
        started = time.monotonic()
        connection.settimeout(0.25)
        answer = b""
        while time.monotonic() - started < seconds and not answer:
            try:
                connection.sendall(drip[:1])
                answer = connection.recv(65536) or b"closed"
            except TimeoutError:
                continue
            except OSError:
                answer = b"closed"
        return answer


def test_a_body_trickled_slower_than_the_timeout_allows_gets_408(served_first):
    # A byte every 0.25 s never stalls a read for 1 s; the whole body must come within 1 s.
    head = b"POST /v1/models/stn:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    assert trickle(served_first, head, b" ").startswith(b"HTTP/1.1 408")


def test_headers_trickled_slower_than_the_timeout_allows_are_cut_off(served_first):
    head = b"GET /v1/models/stn HTTP/1.1\r\nX-Slow: "
    assert trickle(served_first, head, b"x")  # cut off, where a timeout per read never is


def _ipv6_loopback():
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_the_server_listens_on_an_ipv6_address(tmp_path, models, pngs):
    push(str(tmp_path / "stn"), 1, models["first"][0])
    repository = ModelRepository(str(tmp_path), "stn")
    repository.poll()
    server = ModelServer(repository, address=("::1", 0))
    server.start()
    try:
        assert server.url.startswith("http://[::1]:")
        assert predict_classes(server, pngs[:2]).shape == (2,)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "setting",
    [
        "poll_seconds",
        "max_request_bytes",
        "request_timeout_seconds",
        "drain_seconds",
        "max_connections",
    ],
)
def test_server_settings_must_be_positive(tmp_path, setting):
    with pytest.raises(ValueError, match=setting):
        ModelServer(ModelRepository(str(tmp_path), "stn"), **{setting: 0})


def test_connections_past_the_limit_get_503_until_one_closes(tmp_path, models, pngs):
    push(str(tmp_path / "stn"), 1, models["first"][0])
    repository = ModelRepository(str(tmp_path), "stn")
    repository.poll()
    server = ModelServer(repository, max_connections=2)
    server.start()
    status = b"GET /v1/models/stn HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        held = [socket.create_connection(server.server_address[:2]) for _ in range(2)]
        for connection in held:  # answered, then kept alive: each holds a server thread
            connection.sendall(status)
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        once = status.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        answer = raw_exchange(server, once)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
        assert json.loads(body) == {"error": "too many connections; retry"}
        held.pop().close()
        wait_until(lambda: raw_exchange(server, once).startswith(b"HTTP/1.1 200"), "a place")
        for connection in held:
            connection.close()
    finally:
        server.stop()


def test_stop_returns_once_the_requests_being_answered_are(tmp_path, models, pngs):
    (tmp_path / "stn").mkdir()
    push(str(tmp_path / "stn"), 1, models["first"][0])
    server = ModelServer(ModelRepository(str(tmp_path), "stn"))
    server.repository.poll()
    predict, started, finished, answers = server.endpoints.predict, threading.Event(), [], []

    def slow_predict(*args):  # the request is being answered when stop() is called
        started.set()
        time.sleep(0.5)
        finished.append(predict(*args))
        return finished[0]

    server.endpoints.predict = slow_predict
    server.start()
    request = {"instances": [b64(pngs[0])]}
    client = threading.Thread(
        target=lambda: answers.append(call(f"{server.url}/v1/models/stn:predict", request))
    )
    client.start()
    assert started.wait(30)
    server.stop()  # in `serve`, the process exits next
    assert finished, "stop() returned while a request was being answered"
    client.join()
    assert answers[0] == (200, finished[0])


def test_keep_alive_connection_survives_a_bad_request(served_first, pngs):
    good = json.dumps({"instances": [b64(pngs[0])]}).encode()
    bad = b"not json"

    def post(body):
        return (
            b"POST /v1/models/stn:predict HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    answer = raw_exchange(served_first, post(bad) + post(good) + b"GET /nothing HTTP/1.0\r\n\r\n")
    statuses = re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert statuses == [b"400", b"200", b"404"]


def test_a_body_on_any_method_is_read_so_the_next_request_is_parsed(served_first):
    # Two pipelined requests on one connection: a GET with a body, then a plain GET.
    answer = raw_exchange(
        served_first,
        b"GET /v1/models/stn HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /v1/models/stn/versions/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"200"]
    assert answer.count(b'"state": "AVAILABLE"') == 2


def test_a_chunked_body_without_length_is_refused_and_the_connection_closed(served_first):
    answer = raw_exchange(
        served_first,
        b"GET /v1/models/stn HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    )
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"411"]


PREDICT_HEAD = b"POST /v1/models/stn:predict HTTP/1.1\r\nHost: x\r\n"
NEXT_REQUEST = b"GET /v1/models/stn/versions/999 HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("headers", "body", "code", "words"),
    [
        (b"Content-Length: \xb2\r\n", b"{}", 400, "byte count"),
        (b"Content-Length: " + b"9" * 30 + b"\r\n", b"{}", 400, "byte count"),
        (b"Content-Length: 2\r\nContent-Length: 99\r\n", b"{}", 400, "conflicting"),
        (
            b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
            b"2\r\n{}\r\n0\r\n\r\n",
            411,
            "Content-Length",
        ),
    ],
    ids=["non-ASCII digit", "30 digits", "two lengths", "chunked and a length"],
)
def test_a_body_of_unknown_length_is_refused_and_nothing_after_it_is_run(
    served_first, headers, body, code, words
):
    answer = raw_exchange(served_first, PREDICT_HEAD + headers + b"\r\n" + body + NEXT_REQUEST)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [str(code).encode()]
    assert words in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]


def test_a_body_cut_short_is_refused(served_first, pngs):
    body = json.dumps({"instances": [b64(pngs[0])]}).encode()
    host, port = served_first.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(PREDICT_HEAD + f"Content-Length: {len(body) + 500}\r\n\r\n".encode())
        connection.sendall(body)
        connection.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: connection.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 400")
    assert f"ended after {len(body)} of {len(body) + 500} bytes".encode() in answer


@pytest.mark.parametrize(
    ("path", "raw", "code"),
    [
        (":predict", b'{"instances": ' + b"[" * 3000 + b"]" * 3000 + b"}", 400),
        (":predict", b'{"instances": [' + b"7" * 5000 + b"]}", 400),
        ("/versions/" + "9" * 5000, None, 404),
    ],
    ids=["nested too deep", "a 5,000-digit number", "a 5,000-digit version"],
)
def test_absurd_requests_are_the_clients_error_not_the_servers(served_first, path, raw, code):
    status, body = call(f"{served_first.url}/v1/models/stn{path}", raw=raw)
    assert status == code, body


@pytest.mark.parametrize(
    ("method", "suffix", "allowed"),
    [
        ("PUT", ":predict", "POST"),
        ("DELETE", "", "GET"),
        ("GET", ":predict", "POST"),
        ("POST", "/versions/1", "GET"),
    ],
)
def test_other_methods_get_405_with_allow_in_json(served_first, method, suffix, allowed):
    host, port = served_first.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request(method, f"/v1/models/stn{suffix}", body=b"{}")
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 405 and response.getheader("Allow") == allowed
    assert body == {"error": f"{method} /v1/models/stn{suffix} is not supported (only {allowed})"}


def test_head_gets_405_headers_without_a_body(served_first):
    answer = raw_exchange(
        served_first,
        b"HEAD /v1/models/stn HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /v1/models/stn HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    head, _, rest = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 405 ")
    assert {b"Allow: GET", b"Content-Type: application/json"} <= set(lines)
    assert rest.startswith(b"HTTP/1.1 200 ")  # the GET's answer follows the HEAD's headers


@pytest.mark.parametrize(
    ("request_head", "status", "error"),
    [
        (b"FETCH /v1/models/stn HTTP/1.1\r\nHost: x", b"501", "Unsupported method ('FETCH')"),
        (b"GET /v1/models/stn HTTP/1.1\r\nX: " + b"a" * 70000, b"431", "Line too long"),
    ],
    ids=["unknown method", "header too long"],
)
def test_requests_python_refuses_are_answered_in_json_too(
    served_first, request_head, status, error
):
    answer = raw_exchange(served_first, request_head + b"\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 " + status)
    assert {b"Content-Type: application/json", b"Connection: close"} <= set(lines)
    assert json.loads(body) == {"error": error}


def test_the_query_string_is_no_part_of_the_path(served_first, pngs):
    status, body = call(f"{served_first.url}/v1/models/stn?x=1")
    assert status == 200 and body["model_version_status"][0]["version"] == "1"
    status, body = call(
        f"{served_first.url}/v1/models/stn/versions/1:predict?debug=true",
        {"instances": [b64(pngs[0])]},
    )
    assert status == 200 and len(body["predictions"]) == 1
    status, body = call(f"{served_first.url}/healthz?v1/models/stn")
    assert status == 404 and body["error"] == "no such endpoint: /healthz"


# --- versions -------------------------------------------------------------------------------


def test_new_version_replaces_old_without_restart_and_broken_one_does_not(
    serving, models, pixels, pngs, caplog
):
    caplog.set_level(logging.INFO, logger="pipeline.model_repository")
    server, model_dir = serving
    assert call(f"{server.url}/v1/models/stn")[0] == 404  # nothing pushed yet
    assert call(f"{server.url}/v1/models/stn:predict", {"instances": [b64(pngs[0])]})[0] == 404

    _, first_classes = expected(pixels, models["first"])
    _, second_classes = expected(pixels, models["second"])
    assert (first_classes != second_classes).any()  # else the swap would go unseen

    push(model_dir, 1, models["first"][0])
    wait_until(lambda: version_states(server).get("1", {}).get("state") == "AVAILABLE", "v1")
    np.testing.assert_array_equal(predict_classes(server, pngs), first_classes)

    push(model_dir, 2, models["second"][0])
    wait_until(lambda: version_states(server).get("2", {}).get("state") == "AVAILABLE", "v2")
    assert version_states(server)["1"]["state"] == "END"
    np.testing.assert_array_equal(predict_classes(server, pngs), second_classes)

    push_broken(model_dir, 3)
    wait_until(lambda: version_states(server).get("3", {}).get("state") == "END", "v3 to fail")
    states = version_states(server)
    assert states["3"]["status"]["error_code"] != "OK"
    assert states["3"]["status"]["error_message"]
    assert states["2"]["state"] == "AVAILABLE"
    np.testing.assert_array_equal(predict_classes(server, pngs), second_classes)
    assert "model stn: serving version 2" in caplog.text and "(was version 1)" in caplog.text
    assert "version 3 failed to load (still serving version 2)" in caplog.text

    # A failed version is retried once its files change: repair version 3 in place.
    fixed = os.path.join(os.path.dirname(model_dir), "fixed")
    shutil.copytree(models["first"][0], fixed)
    for name in os.listdir(fixed):
        target = os.path.join(model_dir, "3", name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(fixed, name), target)
    wait_until(lambda: version_states(server).get("3", {}).get("state") == "AVAILABLE", "v3 fixed")
    np.testing.assert_array_equal(predict_classes(server, pngs), first_classes)


def test_model_status_is_503_while_no_version_is_available(serving, pngs):
    server, model_dir = serving
    push_broken(model_dir, 1)
    wait_until(
        lambda: version_states(server).get("1", {}).get("state") == "END", "version 1 to fail"
    )
    status, body = call(f"{server.url}/v1/models/stn")
    assert status == 503 and "no version of model stn is available" in body["error"]
    assert [entry["state"] for entry in body["model_version_status"]] == ["END"]
    status, body = call(f"{server.url}/v1/models/stn/versions/1")
    assert status == 200 and body["model_version_status"][0]["status"]["error_code"] == "UNKNOWN"
    status, body = call(f"{server.url}/v1/models/stn:predict", {"instances": [b64(pngs[0])]})
    assert status == 404 and "Servable not found" in body["error"]


def test_half_written_and_foreign_directories_are_not_loaded(tmp_path, models):
    model_dir = tmp_path / "stn"
    model_dir.mkdir()
    push(str(model_dir), 1, models["first"][0])
    shutil.copytree(models["second"][0], model_dir / "5")
    os.remove(model_dir / "5" / "saved_model.pb")  # being copied: the graph has not landed yet
    shutil.copytree(models["second"][0], model_dir / "latest")  # not a version number
    shutil.copytree(models["second"][0], model_dir / ".incoming-6")  # a push in progress
    for name in ("²", "٣"):  # digits to str.isdigit, but no ASCII version number
        shutil.copytree(models["second"][0], model_dir / name)
    assert list(list_versions(str(model_dir))) == [1]
    repository = ModelRepository(str(tmp_path), "stn")
    repository.poll()
    assert repository.served().version == 1
    assert [s.version for s in repository.statuses()] == [1]


def test_graph_copied_last_as_tfx_pusher_does_is_loaded_once_complete(tmp_path, models):
    # TFX's Pusher copies every file but saved_model.pb, then saved_model.pb (not atomically).
    model_dir = tmp_path / "stn"
    shutil.copytree(
        models["first"][0],
        model_dir / "1700000000",
        ignore=lambda d, names: [n for n in names if n == "saved_model.pb"],
    )
    repository = ModelRepository(str(tmp_path), "stn")
    repository.poll()
    assert repository.served() is None and repository.statuses() == []
    graph = (Path(models["first"][0]) / "saved_model.pb").read_bytes()
    (model_dir / "1700000000" / "saved_model.pb").write_bytes(graph[: len(graph) // 2])
    repository.poll()
    assert repository.served() is None
    assert [s.state for s in repository.statuses()] == ["END"]
    repository.poll()  # the same half file is not loaded again
    (model_dir / "1700000000" / "saved_model.pb").write_bytes(graph)
    repository.poll()
    assert repository.served().version == 1700000000
    assert [s.state for s in repository.statuses()] == ["AVAILABLE"]


def test_version_without_the_contract_is_not_served(tmp_path, models):
    class WrongInput(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def serve(self, x):
            return {"probabilities": x, "classes": tf.cast(x, tf.int64)}

    model_dir = tmp_path / "stn"
    model_dir.mkdir()
    push(str(model_dir), 1, models["first"][0])
    module = WrongInput()
    tf.saved_model.save(
        module, str(tmp_path / "wrong"), signatures={"serving_default": module.serve}
    )
    push(str(model_dir), 2, str(tmp_path / "wrong"))
    repository = ModelRepository(str(tmp_path), "stn")
    repository.poll()
    assert repository.served().version == 1
    failed = {s.version: s for s in repository.statuses()}[2]
    assert failed.state == "END" and "'images'" in failed.error_message


def test_removing_the_served_version_falls_back_to_the_next_one(tmp_path, models):
    model_dir = tmp_path / "stn"
    model_dir.mkdir()
    push(str(model_dir), 1, models["first"][0])
    push(str(model_dir), 2, models["second"][0])
    repository = ModelRepository(str(tmp_path), "stn")
    repository.poll()
    assert repository.served().version == 2
    shutil.rmtree(model_dir / "2")
    repository.poll()
    assert repository.served().version == 1
    assert [(s.version, s.state) for s in repository.statuses()] == [(1, "AVAILABLE")]


def test_removing_the_last_version_stops_serving_it_and_a_new_push_under_its_number_loads(
    tmp_path, models, pixels, pngs
):
    model_dir = tmp_path / "stn"
    model_dir.mkdir()
    push(str(model_dir), 1, models["first"][0])
    repository = ModelRepository(str(tmp_path), "stn")
    repository.poll()
    shutil.rmtree(model_dir / "1")
    repository.poll()
    assert repository.served() is None and repository.statuses() == []
    push(str(model_dir), 1, models["second"][0])
    repository.poll()
    outputs = repository.served().signatures["serving_default"](images=tf.constant(pngs))
    probabilities, _ = expected(pixels, models["second"])
    np.testing.assert_allclose(outputs["probabilities"].numpy(), probabilities, atol=1e-5)


def test_a_model_folder_missing_for_a_while_or_a_graph_being_replaced_keeps_serving(
    tmp_path, models
):
    model_dir = tmp_path / "stn"
    model_dir.mkdir()
    push(str(model_dir), 1, models["first"][0])
    push(str(model_dir), 2, models["second"][0])
    repository = ModelRepository(str(tmp_path), "stn")
    repository.poll()
    os.rename(model_dir, tmp_path / "stn.swapping")  # a remount, a swap by rename
    repository.poll()
    assert repository.served().version == 2
    os.rename(tmp_path / "stn.swapping", model_dir)
    os.rename(model_dir / "2" / "saved_model.pb", tmp_path / "saved_model.pb")  # being replaced
    repository.poll()  # not a fall back to version 1
    assert repository.served().version == 2
    assert [(s.version, s.state) for s in repository.statuses()] == [(2, "AVAILABLE")]


def test_the_poller_survives_a_failing_scan(tmp_path, models, monkeypatch, caplog):
    repository = ModelRepository(str(tmp_path), "stn")
    scans = []

    def scan(model_dir):
        scans.append(model_dir)
        if len(scans) == 1:
            raise RuntimeError("a scan that fails")
        return {}

    monkeypatch.setattr("pipeline.model_repository.list_versions", scan)
    stop = threading.Event()
    thread = threading.Thread(target=repository.poll_forever, args=(0.01, stop))
    thread.start()
    wait_until(lambda: len(scans) >= 3, "two more scans after the failing one")
    stop.set()
    thread.join()
    assert "a scan that fails" in caplog.text


@pytest.mark.parametrize("name", ["", "a/b", "stn:predict", ".."])
def test_model_name_must_be_a_plain_directory_name(tmp_path, name):
    with pytest.raises(ValueError, match="model_name"):
        ModelRepository(str(tmp_path), name)


# --- the request codec, without a server ----------------------------------------------------


def test_codec_refuses_bare_values_for_several_inputs():
    with pytest.raises(RequestError, match=r"name the inputs \['a', 'b'\]"):
        parse_predict_request(b'{"instances": [1, 2]}', lambda signature: ["a", "b"])
    with pytest.raises(RequestError, match="mix"):
        parse_predict_request(b'{"instances": [{"a": 1}, 2]}', lambda signature: ["a"])


def test_codec_rows_and_columns_for_several_inputs():
    request = parse_predict_request(
        b'{"instances": [{"a": 1, "b": {"b64": "aGk="}}, {"a": 2, "b": {"b64": ""}}]}',
        lambda signature: ["b", "a"],
    )
    assert request.inputs == {"a": [1, 2], "b": [b"hi", b""]} and request.row_format
    outputs = {"p": np.array([[0.5, 0.5], [1.0, 0.0]]), "c": np.array([0, 1])}
    assert format_predict_response(outputs, row_format=True) == {
        "predictions": [{"p": [0.5, 0.5], "c": 0}, {"p": [1.0, 0.0], "c": 1}]
    }
    assert format_predict_response({"c": np.array([3, 4])}, row_format=False) == {"outputs": [3, 4]}


def test_codec_refuses_values_nested_deeper_than_a_tensor_can_be():
    # TensorFlow aborts the whole process (not an exception) on a list of more than 254 dims.
    def nested(rank):
        return "[" * rank + '{"b64": "aGk="}' + "]" * rank

    for body in (f'{{"inputs": {nested(255)}}}', f'{{"instances": {nested(255)}}}'):
        with pytest.raises(RequestError, match="images: values nested deeper than 254 lists"):
            parse_predict_request(body.encode(), lambda signature: ["images"])
    deepest = parse_predict_request(f'{{"inputs": {nested(254)}}}'.encode(), lambda s: ["images"])
    assert tf.constant(deepest.inputs["images"]).shape.rank == 254


# --- the command line -----------------------------------------------------------------------


def test_serve_module_does_not_import_tensorflow():
    code = "import sys, pipeline.serve_cmd; print('tensorflow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    "argv",
    [
        ["--poll-seconds", "0"],
        ["--poll-seconds", "inf"],
        ["--poll-seconds", "nan"],
        ["--port", "70000"],
        ["--max-request-bytes", "-1"],
    ],
)
def test_serve_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["serve", *argv])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--port", "http"], "argument --port: 'http' is not a port number"),
        (["--poll-seconds", "2s"], "argument --poll-seconds: '2s' is not a number of seconds"),
        (["--max-request-bytes", "16M"], "argument --max-request-bytes: '16M' is not a byte"),
    ],
)
def test_serve_says_what_a_malformed_number_should_be(argv, words, capsys):
    """Not argparse's "invalid _port value", which names a private function."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", *argv])
    err = capsys.readouterr().err
    assert words in err
    assert "invalid _" not in err


def test_serve_command_serves_the_pushed_version_and_stops_on_sigterm(tmp_path, models, caplog):
    model_dir = tmp_path / "serving" / "stn"
    model_dir.mkdir(parents=True)
    push(str(model_dir), 4, models["first"][0])
    answers = []

    def client():  # talks to the server that `serve` runs in the main thread, then stops it
        try:
            wait_until(lambda: "listening on" in caplog.text, "the server to listen")
            url = caplog.text.split("listening on ")[1].split("/v1/")[0]
            answers.append(call(f"{url}/v1/models/stn"))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    previous_handler = signal.getsignal(signal.SIGTERM)
    threads_before = set(threading.enumerate())
    thread = threading.Thread(target=client)
    thread.start()
    try:
        with caplog.at_level(logging.INFO):
            argv = ["serve", "--home", str(tmp_path), "--port", "0", "--poll-seconds", "0.1"]
            assert cli.main(argv) == 0
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        thread.join()
    assert "model stn: serving version 4" in caplog.text
    pollers = [t for t in set(threading.enumerate()) - threads_before if "poll_forever" in t.name]
    assert not pollers
    status, body = answers[0]
    assert status == 200 and body["model_version_status"][0]["version"] == "4"


def test_serve_reports_a_taken_port(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--home", str(tmp_path), "--port", str(port)]) == 2
    assert "stn-pipeline serve: error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("weights_shape", "bias_shape", "wrong"),
    [((NUM_PIXELS - 1, 3), (3,), "weights"), ((NUM_PIXELS, 3), (4,), "bias")],
)
def test_linear_classifier_refuses_wrong_shapes(tmp_path, weights_shape, bias_shape, wrong):
    with pytest.raises(ValueError, match=f"^{wrong} must have shape"):
        save_linear_classifier(tmp_path / "model", np.zeros(weights_shape), np.zeros(bias_shape))
