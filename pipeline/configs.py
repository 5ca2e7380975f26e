"""The pipeline's configuration: one typed object, loadable from YAML, with overrides.

    config = load_config("my.yaml", train_steps=200)   # file values, then overrides
    config.data_dir, config.pipeline_root, config.metadata_path, config.serving_dir

Every field has a default, so ``load_config()`` alone gives the default run. A YAML file holds
a mapping of field names to values; an unknown name, a name given twice or a value of the
wrong type is a ValueError that names the file and the field.
"""

import dataclasses
import math
import os
import re
import types
import typing

import yaml

from components.multiworker_config import MultiWorkerConfig

RUNNING_MODES = ("in_memory", "multi_threading", "multi_processing")
# The names stn_model.models.build_model knows (not imported here: it loads TensorFlow).
MODELS = (
    "cnn",
    "st_cnn_affine",
    "st_cnn_similarity",
    "st_cnn_projective",
    "st_cnn_tps",
    "fcn",
    "st_fcn",
)
# The models whose transformer the rotation equivariance loss can train (a composable one).
EQUIVARIANT_MODELS = ("st_cnn_affine", "st_cnn_similarity", "st_cnn_projective", "st_fcn")
ST_CNN_MODELS = tuple(name for name in MODELS if name.startswith("st_cnn_"))
# Each transformer option (set away from its default) and the models that have what it sets.
_TRANSFORMER_OPTIONS = {
    "st_iterations": (1, (*ST_CNN_MODELS, "st_fcn")),
    "full_resolution_localization": (False, ST_CNN_MODELS),
    "localization_hidden_units": (None, ST_CNN_MODELS),
}
# Strings that may be null (a default) but not empty: an empty path would not be the default.
_NOT_EMPTY = (
    "pipeline_name",
    "model_name",
    "home",
    "container_image",
    "data_root",
    "warm_start_model",
    "kubeflow_pipeline_root",
)
# A model name is a directory under serving/ and a segment of the URL /v1/models/<name>.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def is_version_name(name):
    """Whether a folder under serving/<model>/ is a version: ASCII digits, as TF Serving reads
    version names ('²' passes str.isdigit but not int)."""
    return name.isascii() and name.isdigit()


def check_model_name(name, field="model_name"):
    """Raise a ValueError naming `field` unless `name` can be both that directory and segment."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"{field} must be letters, digits, '_', '-' and '.', not starting with '.', "
            f"got {name!r}"
        )


def check_directory(path, name, must_exist=False):
    """Raise a ValueError naming `name` unless `path` is a directory or, unless `must_exist`,
    could be made one (no file in the way). URIs with a scheme (gs://) are left alone."""
    path = str(path)
    if "://" in path:
        return
    if must_exist and not os.path.exists(path):
        raise ValueError(f"{name} {path} does not exist")
    target = existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if os.path.isdir(existing):
        return
    if existing == target:
        raise ValueError(f"{name} {path} is not a directory")
    raise ValueError(f"{name} {path} cannot be a directory: {existing} is not one")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything a run of the pipeline depends on."""

    # Where things live
    home: str = "./stn_home"
    data_root: str | None = None  # default: <home>/data
    pipeline_name: str = "stn-pipeline"
    model_name: str = "stn"  # served under <home>/serving/<model_name>/<version>/
    # Training (passed to stn_model.trainer through the Trainer's custom_config)
    model: str = "st_cnn_affine"
    epochs: int = 8
    batch_size: int = 128
    learning_rate: float = 2e-3
    train_steps: int | None = None  # if set, train this many steps instead of `epochs` epochs
    eval_steps: int | None = None  # if set, validate on this many batches per epoch
    image_size: int = 42
    num_classes: int = 10
    seed: int = 1
    # The ST models' shape (stn_model.models.build_model); what each buys is in
    # docs/accuracy_experiments.md
    st_iterations: int = 1  # passes of the spatial transformer
    full_resolution_localization: bool = False  # an ST-CNN localization net without its 1st pool
    localization_hidden_units: int | None = None  # a hidden ReLU layer ending the ST-CNN's one
    # The rotation equivariance loss (stn_model.equivariance) on the transformer; 0: off
    equivariance_weight: float = 0.0
    equivariance_angle: float = 45.0  # training images are turned again by up to +-this
    # Blessing
    accuracy_floor: float = 0.9  # eval accuracy a model needs to be blessed at all
    regression_tolerance: float = 0.01  # how far below the baseline's accuracy it may fall
    model_check_timeout_s: int = 300
    # Running
    enable_cache: bool = True
    direct_running_mode: str = "in_memory"
    direct_num_workers: int = 1  # 0: one per CPU core
    beam_args: tuple[str, ...] = ()  # passed to Beam unchanged (e.g. --runner=FlinkRunner ...)
    # Multi-worker training: the settings of components.multiworker_config.MultiWorkerConfig
    # (empty: one worker, the stock Trainer; num_workers defaults to 1 here)
    multiworker: dict = dataclasses.field(default_factory=dict)
    # Data spans: ingest span `span` (default: the newest), or spans span-K+1..span together
    # with `span_window` K, and train on what was ingested
    span: int | None = None
    span_window: int = 1
    max_bad_files: int = 0  # bad inputs ImageExampleGen may skip (named in the summary) per run
    warm_start_model: str | None = None  # a pushed SavedModel whose weights training starts from
    # Kubeflow (`compile`, `schedule`): every step's image; with --target vertex, where
    # artifacts go (default <home>/pipeline_root), e.g. gs://bucket/stn
    container_image: str = "stn-pipeline:0.1.0"
    kubeflow_pipeline_root: str | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "beam_args" and isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, "beam_args", value)
            if not _has_type(value, _FIELD_TYPES[field.name]):
                raise ValueError(
                    f"config field {field.name!r} must be {_type_name(field.name)}, got {value!r}"
                )
        for name in (
            "epochs",
            "batch_size",
            "image_size",
            "num_classes",
            "model_check_timeout_s",
            "span_window",
            "st_iterations",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "max_bad_files"):
            if getattr(self, name) < 0:
                raise ValueError(f"config field {name!r} must be >= 0, got {getattr(self, name)}")
        if self.seed >= 2**32:
            raise ValueError(f"config field 'seed' must be < 2**32 (TensorFlow's), got {self.seed}")
        for name in ("train_steps", "eval_steps", "span", "localization_hidden_units"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"config field {name!r} must be >= 1, got {getattr(self, name)}")
        if self.model not in MODELS:
            raise ValueError(f"config field 'model' must be one of {MODELS}, got {self.model!r}")
        if self.equivariance_weight < 0:
            raise ValueError(
                f"config field 'equivariance_weight' must be >= 0, got {self.equivariance_weight}"
            )
        for name, (default, models) in _TRANSFORMER_OPTIONS.items():
            if getattr(self, name) != default and self.model not in models:
                raise ValueError(
                    f"config field {name!r} needs a model of {models}, got model {self.model!r}"
                )
        if self.equivariance_weight and self.model not in EQUIVARIANT_MODELS:
            raise ValueError(
                f"config field 'equivariance_weight' needs a model of {EQUIVARIANT_MODELS}, "
                f"got model {self.model!r}"
            )
        if not 0 < self.equivariance_angle <= 180:
            raise ValueError(
                f"config field 'equivariance_angle' must be in (0, 180], "
                f"got {self.equivariance_angle}"
            )
        if not 0 <= self.accuracy_floor <= 1:
            raise ValueError(
                f"config field 'accuracy_floor' must be in [0, 1], got {self.accuracy_floor}"
            )
        if not 0 <= self.regression_tolerance <= 1:
            raise ValueError(
                f"config field 'regression_tolerance' must be in [0, 1], "
                f"got {self.regression_tolerance}"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"config field 'learning_rate' must be > 0, got {self.learning_rate}")
        if self.direct_running_mode not in RUNNING_MODES:
            raise ValueError(
                f"config field 'direct_running_mode' must be one of {RUNNING_MODES}, "
                f"got {self.direct_running_mode!r}"
            )
        if self.direct_num_workers < 0:
            raise ValueError(
                f"config field 'direct_num_workers' must be >= 0, got {self.direct_num_workers}"
            )
        for name in _NOT_EMPTY:
            if getattr(self, name) == "":
                raise ValueError(f"config field {name!r} must not be empty")
        check_model_name(self.model_name, "config field 'model_name'")
        try:
            self.multiworker_config()
        except (ValueError, TypeError) as error:
            raise ValueError(f"config field 'multiworker': {error}") from None
        if self.multiworker_config().mixed_precision and not self.uses_multiworker_trainer:
            raise ValueError(
                "config field 'multiworker': mixed_precision (--mixed-precision) needs the "
                "multi-worker trainer, num_workers > 1 (--workers) or backend 'kubernetes'; "
                "one local worker is the stock Trainer, which trains in float32"
            )

    def multiworker_config(self):
        """The `MultiWorkerConfig` of the `multiworker` field (num_workers defaults to 1)."""
        return MultiWorkerConfig.from_dict({"num_workers": 1, **self.multiworker})

    @property
    def uses_multiworker_trainer(self):
        """Whether training needs the multi-worker trainer (several workers, or Kubernetes)."""
        workers = self.multiworker_config()
        return workers.num_workers > 1 or workers.backend != "local"

    @property
    def home_dir(self):
        return _absolute(self.home)

    @property
    def data_dir(self):
        return _absolute(self.data_root or os.path.join(self.home, "data"))

    @property
    def pipeline_root(self):
        return os.path.join(self.home_dir, "pipeline_root")

    @property
    def metadata_path(self):
        return os.path.join(self.home_dir, "metadata.sqlite")

    @property
    def serving_dir(self):
        """Where the Pusher writes versions: <home>/serving/<model_name>/."""
        return os.path.join(self.home_dir, "serving", self.model_name)

    def trainer_custom_config(self):
        """What `stn_model.trainer.run_fn` reads from ``fn_args.custom_config``."""
        names = (
            "model",
            "epochs",
            "batch_size",
            "learning_rate",
            "image_size",
            "num_classes",
            "seed",
            "st_iterations",
            "full_resolution_localization",
            "localization_hidden_units",
            "equivariance_weight",
            "equivariance_angle",
        )
        options = {name: getattr(self, name) for name in names}
        if self.warm_start_model is not None:
            options["warm_start_model"] = self.warm_start_model
        return options

    def beam_pipeline_args(self):
        """Beam's arguments: DirectRunner settings, unless `beam_args` picks another runner."""
        runners = [arg.split("=", 1)[1] for arg in self.beam_args if arg.startswith("--runner=")]
        if runners and runners[-1] not in ("DirectRunner", "direct"):
            return list(self.beam_args)
        direct = [
            f"--direct_running_mode={self.direct_running_mode}",
            f"--direct_num_workers={self.direct_num_workers}",
        ]
        return direct + list(self.beam_args)

    def replace(self, **overrides):
        """A copy with `overrides` (field name -> value) applied; None values are ignored."""
        overrides = {name: value for name, value in overrides.items() if value is not None}
        _check_names(overrides, "overrides")
        return dataclasses.replace(self, **overrides)


_FIELD_TYPES = typing.get_type_hints(PipelineConfig)


def _absolute(path):
    """`path` made absolute, `~` expanded as a shell would (a YAML file does not), unless it
    is a URI with a scheme (gs://, s3://), kept as is."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _has_type(value, annotation):
    if isinstance(annotation, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if typing.get_origin(annotation) is tuple:
        return isinstance(value, tuple) and all(isinstance(item, str) for item in value)
    if annotation is float:
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(name):
    names = {
        int: "an integer",
        float: "a finite number",
        str: "a string",
        bool: "true or false",
        dict: "a mapping",
    }
    annotation = _FIELD_TYPES[name]
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    if options:
        return " or ".join("null" if o is type(None) else names.get(o, str(o)) for o in options)
    if typing.get_origin(annotation) is tuple:
        return "a list of strings"
    return names.get(annotation, str(annotation))


def _check_names(values, where):
    known = set(_FIELD_TYPES)
    unknown = sorted(set(values) - known, key=str)  # YAML keys need not be strings
    if unknown:
        raise ValueError(f"{where}: unknown config field(s) {unknown}; known: {sorted(known)}")


def load_config(path=None, defaults=None, multiworker_updates=None, **overrides):
    """The default config with the fields of `defaults` (a mapping) in place of the built-in
    ones, updated by the YAML file at `path` (if any), then by `overrides` (None: not given)
    and by `multiworker_updates`, which update the `multiworker` section key by key.

    The result must be consistent, not the file alone: a file that sets mixed precision for
    one worker is fine with `multiworker_updates={"num_workers": 2}`. An error names the file
    when the file alone has the same fault.
    """
    values = dict(defaults or {})
    loaded = {} if path is None else _read_config_file(path)
    values.update(loaded)
    given = {name: value for name, value in overrides.items() if value is not None}
    _check_names(given, "overrides")
    values.update(given)
    if multiworker_updates and isinstance(values.get("multiworker", {}), dict):
        values["multiworker"] = {**values.get("multiworker", {}), **multiworker_updates}
    try:
        return PipelineConfig(**values)
    except ValueError as error:
        if path is not None and _fails_with(str(error), {**(defaults or {}), **loaded}):
            raise ValueError(f"config file {path}: {error}") from None
        raise


def _fails_with(message, values):
    """Whether `PipelineConfig(**values)` fails with `message`: the same fault, on its own."""
    try:
        PipelineConfig(**values)
    except ValueError as error:
        return str(error) == message
    return False


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the
    last one silently); a key that a merge (`<<: *anchor`) brings in may still be set. It reads
    numbers such as 1e-3 and 1.0e3 as YAML 1.2 does, as floats (PyYAML's YAML 1.1: strings)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found key {key!r} twice",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


class ConfigDumper(yaml.SafeDumper):
    """YAML's safe dumper that quotes a string `_ConfigLoader` would read as a number ('1e5'),
    so that `load_config` reads what it writes back as it was."""


for _class in (_ConfigLoader, ConfigDumper):
    _class.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )


def _read_config_file(path):
    """The mapping of field names to values in the YAML file at `path`."""
    try:
        with open(path) as handle:
            loaded = yaml.load(handle, Loader=_ConfigLoader)  # a SafeLoader
    except OSError as error:
        raise ValueError(f"cannot read config file {path}: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"config file {path} is not UTF-8 text: {error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of field names to values")
    _check_names(loaded, f"config file {path}")
    return loaded
