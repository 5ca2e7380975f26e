"""An HTTP model server speaking TF Serving's REST API for the pushed SavedModels.

Why this server: TF Serving's `tensorflow_model_server` binary cannot be obtained on the
project's machines, and KServe's Python model server (kserve 0.15.2), which speaks the same
REST API, needs pandas>=2.2 and so cannot share one environment with TFX 1.16 (pandas<2). This
server is built on the standard library's ThreadingHTTPServer: it adds no dependency, and one
thread per connection is enough because TensorFlow releases the GIL while it runs the model.
In production TF Serving's own image (tensorflow/serving, also what KServe's TensorFlow
predictor runs) reads the same `serving/<model_name>/<version>/` layout and answers the same
requests, so clients need not change.

Endpoints: `GET /v1/models/<name>[/versions/<N>]` (version status) and
`POST /v1/models/<name>[/versions/<N>]:predict`; a query string is ignored. HEAD, PUT, DELETE,
PATCH and OPTIONS are answered 405 with an `Allow` header; every error body is
`{"error": "..."}`, Python's own refusals (a malformed request, an unknown method) included.
A request must arrive whole within `request_timeout_seconds` (60) of its first byte, and a
kept-alive connection is closed after as long without one: a slow client cannot hold a thread.
Past `max_connections` (256) open at once, a new connection is answered 503 and closed.
"""

import contextlib
import io
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import tensorflow as tf

from pipeline.predict_codec import RequestError, format_predict_response, parse_predict_request

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]{1,19}))?(?P<verb>:[a-z]+)?$"
)
_BYTE_COUNT = re.compile(r"[0-9]{1,19}")
_METHOD_OF_VERB = {None: "GET", ":predict": "POST"}  # the one method each endpoint answers


def _tf_error_message(error):
    """The lines of a TensorFlow error that say what is wrong, without graph locations."""
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[")
    lines = (line.strip() for line in error.message.splitlines())
    return " ".join(line for line in lines if line and not line.startswith(noise))


class ModelEndpoints:
    """Answers status and predict requests for the model held by a `ModelRepository`."""

    def __init__(self, repository):
        self.repository = repository

    def status(self, model_name, version):
        """(HTTP status, TF Serving's version status JSON).

        The model's status (no version asked) is 503 until some version is AVAILABLE, so it can
        be a readiness probe; the body lists the versions either way.
        """
        self._check_name(model_name)
        statuses = [
            s for s in self.repository.statuses() if version is None or s.version == version
        ]
        if not statuses:
            which = "any versions" if version is None else f"version {version}"
            raise RequestError(f"Could not find {which} of model {model_name}", 404)
        payload = {"model_version_status": [s.to_json() for s in statuses]}
        if version is None and all(s.state != "AVAILABLE" for s in statuses):
            payload["error"] = f"no version of model {model_name} is available"
            return HTTPStatus.SERVICE_UNAVAILABLE, payload
        return HTTPStatus.OK, payload

    def predict(self, model_name, version, body):
        self._check_name(model_name)
        served = self.repository.served()
        if served is None or (version is not None and version != served.version):
            wanted = "Latest" if version is None else f"Specific({model_name}, {version})"
            raise RequestError(f"Servable not found for request: {wanted}", 404)

        def input_names_of(signature_name):
            if signature_name not in served.signatures:
                raise RequestError(
                    f"signature_name {signature_name!r} not found; model version "
                    f"{served.version} has {sorted(served.signatures)}"
                )
            return served.signatures[signature_name].structured_input_signature[1].keys()

        request = parse_predict_request(body, input_names_of)
        signature = served.signatures[request.signature_name]
        specs = signature.structured_input_signature[1]
        tensors = {
            name: self._to_tensor(name, values, specs[name])
            for name, values in request.inputs.items()
        }
        try:
            outputs = signature(**tensors)
        except tf.errors.InvalidArgumentError as error:  # e.g. bytes that are no image
            raise RequestError(_tf_error_message(error)) from None
        except UnicodeDecodeError:  # TensorFlow's error quoted input bytes that are not UTF-8
            raise RequestError(
                f"signature {request.signature_name!r} refused the input, quoting bytes that "
                "are not text: is each value what the signature takes?"
            ) from None
        arrays = {name: tensor.numpy() for name, tensor in outputs.items()}
        return format_predict_response(arrays, request.row_format)

    def _check_name(self, model_name):
        if model_name != self.repository.model_name:
            raise RequestError(f"Servable not found for request: model {model_name!r}", 404)

    @staticmethod
    def _to_tensor(name, values, spec):
        try:
            tensor = tf.constant(values, dtype=spec.dtype)
        except (TypeError, ValueError) as error:
            raise RequestError(
                f"input {name!r} is not a {spec.dtype.name} tensor: {error}"
            ) from None
        if not spec.shape.is_compatible_with(tensor.shape):
            raise RequestError(f"input {name!r} has shape {tensor.shape}, expected {spec.shape}")
        return tensor


class _DeadlineReader(io.RawIOBase):
    """A socket's reading end whose reads all end at `deadline` (time.monotonic()), if set."""

    def __init__(self, connection):
        self._connection = connection
        self.deadline = None

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request's time is up")
            self._connection.settimeout(left)
        return self._connection.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    server_version = "stn-model-server"
    disable_nagle_algorithm = True  # headers and body are two writes: don't wait for an ACK

    @property
    def timeout(self):  # seconds a client may stall, or take to send a whole request
        return self.server.request_timeout_seconds

    def setup(self):
        super().setup()
        self.rfile.close()  # the socket's own reader: replaced by one that keeps the deadline
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        """One request, whose line, headers and body must all arrive within `timeout` s of its
        first byte: a timeout per read alone lets a client trickle a byte at a time forever."""
        try:
            self.rfile.peek(1)  # a kept-alive connection waits up to `timeout` s for a request
        except (TimeoutError, ConnectionError):  # idle too long, or reset between requests
            self.close_connection = True
            return
        self._reader.deadline = time.monotonic() + self.timeout
        try:
            super().handle_one_request()
        except ConnectionError:  # reset while its request was read or answered
            self._client_left()
        finally:
            self._stop_deadline()

    def _stop_deadline(self):
        """The request is read (or refused): the socket's timeout is per operation again."""
        self._reader.deadline = None
        self.connection.settimeout(self.timeout)

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code, message=None, explain=None):
        """Python's own refusals (a malformed request line, an unknown method), in JSON too."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True  # the request was not understood, nor where the next starts
        self._send_json(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase}, {})

    def _answer(self):
        """Route the request and answer it; a refusal or a failure as {"error": ...}."""
        with self.server.answering():
            headers = {}
            try:
                status, payload = self._route()
            except RequestError as error:
                status, payload = HTTPStatus(error.status), {"error": str(error)}
                headers = error.headers
            except ConnectionError:  # reset while its request was read: no one to answer
                self._client_left()
                return
            except Exception as error:  # a bug or a model failure: answer it, keep serving
                log.exception("error answering %s %s", self.command, self.path)
                status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(error)}
            self._send_json(status, payload, headers)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

    def _send_json(self, status, payload, headers):
        """Answer `payload` as JSON, with `headers`; to a HEAD request, the headers alone."""
        self._stop_deadline()
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _client_left(self):
        """A client that closed its connection before its answer: a line, not a traceback."""
        log.info("%s closed the connection before its answer", self.address_string())
        self.close_connection = True

    def _route(self):
        body = self._read_body()  # first, so an early answer leaves no bytes unread
        path = urllib.parse.urlsplit(self.path).path
        match = _MODEL_PATH.match(path)
        if not match:
            raise RequestError(f"no such endpoint: {path}", 404)
        name, verb = match["name"], match["verb"]
        version = int(match["version"]) if match["version"] else None
        allowed = _METHOD_OF_VERB.get(verb)
        if self.command != allowed:
            what = f"only {allowed}" if allowed else "only status and :predict"
            raise RequestError(
                f"{self.command} {path} is not supported ({what})", 405, {"Allow": allowed or ""}
            )
        if verb is None:
            return self.server.endpoints.status(name, version)
        return HTTPStatus.OK, self.server.endpoints.predict(name, version, body)

    def _read_body(self):
        """The request body of any method: b"" without one; POST needs a Content-Length.

        A body that cannot be read exactly (no length or a bad one, chunked, too large, cut
        short or late) is refused and the connection closed: where the next request starts is
        not known.
        """
        lengths = set(self.headers.get_all("Content-Length", []))
        if not lengths and self.command != "POST" and "Transfer-Encoding" not in self.headers:
            return b""
        try:
            return self._read_exactly(lengths)
        except RequestError:
            self.close_connection = True
            raise

    def _read_exactly(self, lengths):
        if "Transfer-Encoding" in self.headers or not lengths:
            raise RequestError("a Content-Length (and no Transfer-Encoding) is required", 411)
        if len(lengths) > 1:
            raise RequestError(f"conflicting Content-Length headers: {sorted(lengths)}")
        (length,) = lengths
        if not _BYTE_COUNT.fullmatch(length):
            raise RequestError(f"Content-Length must be a byte count, got {length!r}")
        limit = self.server.max_request_bytes
        if int(length) > limit:  # the body stays unread
            raise RequestError(f"request body of {length} bytes exceeds the limit of {limit}", 413)
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            raise RequestError(
                f"the request body did not arrive within {self.timeout} s", 408
            ) from None
        if len(body) < int(length):
            raise RequestError(f"the request body ended after {len(body)} of {length} bytes")
        return body


_BUSY_BODY = json.dumps({"error": "too many connections; retry"}).encode()
_BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n"
    + f"Content-Length: {len(_BUSY_BODY)}\r\n\r\n".encode()
    + _BUSY_BODY
)


class ModelServer(ThreadingHTTPServer):
    """The HTTP server plus a thread that polls the model directory for new versions.

    `start()` serves in background threads (tests, benchmarks); `serve_forever()` after
    `start_polling()` serves in the calling thread (the CLI). `stop()` ends both, once the
    requests being answered are (for at most `drain_seconds`).
    """

    daemon_threads = True

    def __init__(
        self,
        repository,
        address=("127.0.0.1", 0),
        poll_seconds=2.0,
        max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
        request_timeout_seconds=60.0,
        drain_seconds=20.0,
        max_connections=256,
    ):
        for name, value in (
            ("poll_seconds", poll_seconds),
            ("max_request_bytes", max_request_bytes),
            ("request_timeout_seconds", request_timeout_seconds),
            ("drain_seconds", drain_seconds),
            ("max_connections", max_connections),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if ":" in address[0]:  # an IPv6 address ("::" for all of them)
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.endpoints = ModelEndpoints(repository)
        self.repository = repository
        self.poll_seconds = poll_seconds
        self.max_request_bytes = max_request_bytes
        self.request_timeout_seconds = request_timeout_seconds
        self.drain_seconds = drain_seconds
        self._connections = threading.BoundedSemaphore(max_connections)  # one per thread
        self._answering = 0  # requests being answered now
        self._answered = threading.Condition()
        self._stop_polling = threading.Event()
        self._background_threads = []

    def process_request(self, request, client_address):
        """Serve the connection in a thread of its own; past `max_connections` open at once,
        answer 503 and close it instead, so that a flood of clients cannot take every thread."""
        if not self._connections.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_BUSY_ANSWER)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started to give the place back
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start_polling(self):
        self._spawn(self.repository.poll_forever, self.poll_seconds, self._stop_polling)

    def start(self):
        self.start_polling()
        self._spawn(self.serve_forever)

    @contextlib.contextmanager
    def answering(self):
        """Count the request answered within, so that `stop()` can wait for it."""
        with self._answered:
            self._answering += 1
        try:
            yield
        finally:
            with self._answered:
                self._answering -= 1
                self._answered.notify_all()

    def stop(self):
        self._stop_polling.set()
        self.shutdown()
        self.server_close()
        with self._answered:  # the process may exit next, ending the requests' threads
            if not self._answered.wait_for(lambda: self._answering == 0, self.drain_seconds):
                log.warning("stopping with %d requests unanswered", self._answering)
        for thread in self._background_threads:
            thread.join()

    def _spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._background_threads.append(thread)
