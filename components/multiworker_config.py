"""Settings of the multi-worker trainer: how many workers, where they run, how they recover.

The settings travel inside the Trainer's `custom_config` under the key `CONFIG_KEY`, so the
stock Trainer spec (and with it Evaluator, Resolver and Pusher) stays unchanged. The executor
removes the key again before the Trainer module's `run_fn` sees `custom_config`.
"""

import dataclasses
from typing import Any

CONFIG_KEY = "multiworker"
BACKENDS = ("local", "kubernetes")


@dataclasses.dataclass(frozen=True)
class KubernetesConfig:
    """Where and how the Kubernetes backend creates its workers.

    The pipeline root must live on the PersistentVolumeClaim `pvc`, mounted in every worker
    at `mount_path` (the same path the pipeline uses), so workers read the examples and
    write the model where the executor expects them. Each worker requests (and is limited
    to) `cpu` and `memory`. Without `namespace`, the workers run in the namespace of the
    retraining pod (`STN_NAMESPACE`), else in `default`. A worker group that has not finished
    after `poll_timeout_s` is stopped; a worker pod that no node can take fails the group
    after `unschedulable_grace_s`.
    """

    image: str
    pvc: str
    mount_path: str
    cpu: str
    memory: str
    namespace: str | None = None
    gpus_per_worker: int = 0
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    service_account: str | None = None
    port: int = 2222
    # Within the retraining CronJob's activeDeadlineSeconds (6 h, k8s/base/retrain-cronjob.yaml),
    # which also covers the pipeline's other components.
    poll_timeout_s: int = 5 * 3600
    unschedulable_grace_s: int = 600

    def __post_init__(self):
        for name in ("image", "pvc", "mount_path"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"kubernetes.{name} must be a non-empty string")
        if self.namespace is not None and (
            not isinstance(self.namespace, str) or not self.namespace
        ):
            raise ValueError(
                f"kubernetes.namespace must be a non-empty string, got {self.namespace!r}"
            )
        for name in ("cpu", "memory"):
            _check_quantity(f"kubernetes.{name}", getattr(self, name))
        if not self.mount_path.startswith("/"):
            raise ValueError(f"kubernetes.mount_path must be absolute, got {self.mount_path!r}")
        if not _is_count(self.gpus_per_worker, minimum=0):
            raise ValueError(
                f"kubernetes.gpus_per_worker must be an integer >= 0, got {self.gpus_per_worker!r}"
            )
        if not _is_count(self.port, minimum=1) or self.port > 65535:
            raise ValueError(f"kubernetes.port must be an integer in 1..65535, got {self.port!r}")
        for name in ("poll_timeout_s", "unschedulable_grace_s"):
            if not _is_count(getattr(self, name), minimum=1):
                raise ValueError(
                    f"kubernetes.{name} must be an integer >= 1, got {getattr(self, name)!r}"
                )
        if not isinstance(self.node_selector, dict) or not all(
            isinstance(key, str) and isinstance(value, str)
            for key, value in self.node_selector.items()
        ):
            raise ValueError(
                "kubernetes.node_selector must map label names to string values (quote "
                f"'true' and numbers in YAML), got {self.node_selector!r}"
            )
        if not isinstance(self.tolerations, list) or not all(
            isinstance(t, dict) for t in self.tolerations
        ):
            raise ValueError("kubernetes.tolerations must be a list of toleration objects")


@dataclasses.dataclass(frozen=True)
class MultiWorkerConfig:
    """`num_workers` workers on `backend`; a failed group restarts up to `max_restarts` times."""

    num_workers: int = 2
    backend: str = "local"
    max_restarts: int = 2
    mixed_precision: bool = False
    kubernetes: KubernetesConfig | None = None

    def __post_init__(self):
        if not _is_count(self.num_workers, minimum=1):
            raise ValueError(f"num_workers must be an integer >= 1, got {self.num_workers!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not _is_count(self.max_restarts, minimum=0):
            raise ValueError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        if not isinstance(self.mixed_precision, bool):  # a YAML "false" is a true string
            raise ValueError(f"mixed_precision must be true or false, got {self.mixed_precision!r}")
        if self.backend == "kubernetes" and self.kubernetes is None:
            raise ValueError("backend 'kubernetes' needs the 'kubernetes' settings")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MultiWorkerConfig":
        """Builds the config from plain values (JSON), naming any unknown field."""
        values = dict(values)
        k8s = values.pop("kubernetes", None)
        _reject_unknown(cls, values, "multiworker")
        if k8s is not None:
            if not isinstance(k8s, dict):
                raise ValueError(f"multiworker.kubernetes must be a mapping, got {k8s!r}")
            _reject_unknown(KubernetesConfig, k8s, "multiworker.kubernetes")
            _require(KubernetesConfig, k8s, "multiworker.kubernetes")
            values["kubernetes"] = KubernetesConfig(**k8s)
        return cls(**values)


def _is_count(value, minimum):
    """An int (a YAML `true` is not a count) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_quantity(field: str, value) -> None:
    """A positive Kubernetes resource quantity string ("2", "500m", "6Gi"), else ValueError."""
    from kubernetes.utils.quantity import parse_quantity  # only a Kubernetes config needs it

    problem = None
    if not isinstance(value, str):
        problem = "is not a string"
    else:
        try:
            if parse_quantity(value) <= 0:
                problem = "is not positive"
        except ValueError:
            problem = "is not a Kubernetes quantity"
    if problem:
        raise ValueError(
            f"{field} must be a positive Kubernetes quantity such as '2', '500m' or '6Gi'; "
            f"{value!r} {problem}"
        )


def _require(cls, values: dict[str, Any], where: str) -> None:
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(values))
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}")


def _reject_unknown(cls, values: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
