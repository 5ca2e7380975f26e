"""The versions of one model in TF Serving's layout, `<base>/<model_name>/<version>/`.

`ModelRepository.poll()` scans the model directory and serves the newest version that loads,
as TF Serving's default "latest" version policy does. A version directory is considered only
once it holds `saved_model.pb`: TFX's Pusher copies that file last, and TF Serving relies on the
same signal. A version that fails to load (a graph file still being written, a broken export)
is logged, shown in the status, and retried once its files change, while the version already
loaded keeps serving. A served version whose directory is removed stops serving: the newest
other version that loads takes over, or none does, as in TF Serving; while the model directory
itself is missing (a remount, a swap by rename), or only the served version's saved_model.pb
(being replaced), nothing changes, as in TF Serving too.
"""

import dataclasses
import logging
import os
import threading

import tensorflow as tf

from pipeline.configs import check_model_name, is_version_name

log = logging.getLogger(__name__)

SAVED_MODEL_FILE = "saved_model.pb"
SERVING_SIGNATURE = "serving_default"
IMAGES_INPUT = "images"
REQUIRED_OUTPUTS = ("probabilities", "classes")


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    """One entry of TF Serving's `model_version_status`."""

    version: int
    state: str  # TF Serving's states: "LOADING", "AVAILABLE" or "END"
    error_message: str = ""

    def to_json(self):
        return {
            "version": str(self.version),
            "state": self.state,
            "status": {
                "error_code": "UNKNOWN" if self.error_message else "OK",
                "error_message": self.error_message,
            },
        }


@dataclasses.dataclass(frozen=True)
class LoadedVersion:
    """A loaded SavedModel version; `signatures` maps names to concrete functions."""

    version: int
    path: str
    signatures: dict
    saved_model: object  # holds the variables the signatures use


def list_versions(model_dir):
    """`{version: path}` for the version directories under `model_dir` holding saved_model.pb."""
    try:
        names = os.listdir(model_dir)
    except FileNotFoundError:
        return {}
    return {
        int(name): os.path.join(model_dir, name)
        for name in names
        if is_version_name(name) and os.path.isfile(os.path.join(model_dir, name, SAVED_MODEL_FILE))
    }


def directory_fingerprint(path):
    """Names, sizes and modification times of every file under `path`: changes when they do."""
    entries = []
    for root, _, files in os.walk(path):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            entries.append(
                (os.path.relpath(os.path.join(root, name), path), stat.st_size, stat.st_mtime_ns)
            )
    return tuple(sorted(entries))


def load_version(version, path):
    """Load a SavedModel version and check the serving contract; ValueError names what is wrong."""
    saved_model = tf.saved_model.load(path)
    signatures = dict(saved_model.signatures)
    if SERVING_SIGNATURE not in signatures:
        raise ValueError(f"{path}: no signature {SERVING_SIGNATURE!r} (has {sorted(signatures)})")
    serving = signatures[SERVING_SIGNATURE]
    inputs = serving.structured_input_signature[1]
    images = inputs.get(IMAGES_INPUT)
    if images is None or images.dtype != tf.string or images.shape.rank != 1:
        raise ValueError(
            f"{path}: {SERVING_SIGNATURE} must take {IMAGES_INPUT!r}, a 1-D tf.string tensor;"
            f" it takes {inputs}"
        )
    missing = [name for name in REQUIRED_OUTPUTS if name not in serving.structured_outputs]
    if missing:
        raise ValueError(f"{path}: {SERVING_SIGNATURE} lacks the outputs {missing}")
    return LoadedVersion(version, path, signatures, saved_model)


class ModelRepository:
    """Loads the newest loadable version of one model and swaps it in when a newer one lands."""

    def __init__(self, base_dir, model_name):
        check_model_name(model_name)
        self.model_name = model_name
        self.model_dir = os.path.join(base_dir, model_name)
        self._served = None
        self._statuses = {}
        self._failed = {}  # version -> fingerprint of the files that failed to load
        self._poll_lock = threading.Lock()

    def served(self):
        """The `LoadedVersion` that answers requests now, or None when none is served."""
        return self._served

    def statuses(self):
        """`VersionStatus` of every version known, newest first."""
        statuses = dict(self._statuses)
        return [statuses[version] for version in sorted(statuses, reverse=True)]

    def poll(self):
        """Scan the model directory once; load and serve a newer version if there is one."""
        with self._poll_lock:
            versions = list_versions(self.model_dir)
            if self._served is not None and os.path.isdir(self._served.path):
                versions.setdefault(self._served.version, self._served.path)  # graph replaced
            for version in sorted(versions, reverse=True):
                if self._served is not None and version == self._served.version:
                    break
                if self._try_load(version, versions[version]):
                    break
            else:  # no newer version loaded, and the served one (if any) was removed
                self._unload_removed()
            kept = set(versions) | ({self._served.version} if self._served else set())
            self._statuses = {v: s for v, s in self._statuses.items() if v in kept}
            self._failed = {v: f for v, f in self._failed.items() if v in versions}

    def poll_forever(self, interval_seconds, stop):
        """Call `poll` every `interval_seconds` until the `threading.Event` `stop` is set."""
        while not stop.wait(interval_seconds):
            try:
                self.poll()
            except Exception:  # an unreadable directory, a bug: log it, keep polling
                log.exception("model %s: cannot scan %s", self.model_name, self.model_dir)

    def _unload_removed(self):
        """Stop serving the removed served version, unless the model's directory is gone too."""
        if self._served is None or not os.path.isdir(self.model_dir):
            return
        log.warning(
            "model %s: version %d was removed from %s and no other version loads; serving none",
            self.model_name,
            self._served.version,
            self.model_dir,
        )
        self._served = None

    def _try_load(self, version, path):
        try:
            fingerprint = directory_fingerprint(path)
        except OSError:  # the directory is being renamed or removed: look again next poll
            return False
        if self._failed.get(version) == fingerprint:
            return False
        self._statuses[version] = VersionStatus(version, "LOADING")
        try:
            loaded = load_version(version, path)
        except Exception as error:  # any load failure must leave the served version in place
            message = f"{type(error).__name__}: {error}"
            self._failed[version] = fingerprint
            self._statuses[version] = VersionStatus(version, "END", message)
            still = (
                f"still serving version {self._served.version}"
                if self._served
                else "no version served"
            )
            log.error(
                "model %s: version %d failed to load (%s): %s",
                self.model_name,
                version,
                still,
                message,
            )
            return False
        previous, self._served = self._served, loaded
        self._failed.pop(version, None)
        self._statuses[version] = VersionStatus(version, "AVAILABLE")
        if previous is None:
            log.info("model %s: serving version %d from %s", self.model_name, version, path)
        else:
            self._statuses[previous.version] = VersionStatus(previous.version, "END")
            log.info(
                "model %s: serving version %d from %s (was version %d)",
                self.model_name,
                version,
                path,
                previous.version,
            )
        return True
