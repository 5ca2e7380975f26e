"""The TFX pipeline: ingest, validate, train, evaluate against the last approved model, push.

    ImageExampleGen -> StatisticsGen -> schema -> ExampleValidator -> AnomalyGate
      -> Trainer -> Resolver (latest approved model) -> Evaluator -> ModelCheck -> Pusher
      -> PushApproval (a pushed model is the next runs' baseline)

The Pusher renames a finished copy into ``serving/<model>/<version>/`` (`atomic_pusher`).

With `span_window` K > 1, ImageExampleGen ingests spans N-K+1..N as one Examples artifact, so
the gate validates everything the Trainer trains on and the Evaluator evaluates on the eval
split of the whole window.

Orchestrator-neutral: `create_pipeline(config, metadata_connection_config, beam_pipeline_args)`
returns a `tfx.dsl.Pipeline`; `pipeline.local_runner` runs it on one machine.
"""

import tensorflow_model_analysis as tfma
from tfx import v1 as tfx
from tfx.dsl.components.base import executor_spec

from components import atomic_pusher
from components.image_example_gen import ImageExampleGen
from components.model_check import ModelCheck, PushApproval
from components.multiworker_trainer import MultiWorkerTrainer
from pipeline.validation import build_validation
from stn_model.trainer import training_code_digest

TRAINER_RUN_FN = "stn_model.trainer.run_fn"
EXAMPLES_SIGNATURE = "serving_examples"  # stn_model.serving.EXAMPLES_SIGNATURE
LABEL_KEY = "label"
SLICE_FEATURES = ("label", "variant")
ACCURACY_METRIC = "sparse_categorical_accuracy"
MODEL_CHECK_ID = "ModelCheck"
APPROVAL_ID = "PushApproval"


# TFMA computes accuracy in float32: 900/1000 is 0.89999998, and 960/1000 - 970/1000 is
# -0.01000005. This slack, float32's spacing between 1 and 2, is more than the rounding of an
# accuracy (at most 1) or of a difference of two, and less than one example in 8 million: it
# keeps a model exactly at the floor or the tolerance blessed, and no model below them.
_BLESSING_SLACK = 2.0**-23


def eval_config(config):
    """TFMA: accuracy overall, per label and per variant; the blessing thresholds (overall)."""
    threshold = tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(
            lower_bound={"value": config.accuracy_floor - _BLESSING_SLACK}
        ),
        # Ignored by the Evaluator when there is no baseline yet (the first run).
        change_threshold=tfma.GenericChangeThreshold(
            direction=tfma.MetricDirection.HIGHER_IS_BETTER,
            absolute={"value": -config.regression_tolerance - _BLESSING_SLACK},
        ),
    )
    return tfma.EvalConfig(
        model_specs=[
            tfma.ModelSpec(
                signature_name=EXAMPLES_SIGNATURE,
                label_key=LABEL_KEY,
                prediction_key="probabilities",
                model_type=tfma.TF_GENERIC,
            )
        ],
        slicing_specs=[tfma.SlicingSpec()]
        + [tfma.SlicingSpec(feature_keys=[feature]) for feature in SLICE_FEATURES],
        metrics_specs=[
            tfma.MetricsSpec(
                metrics=[
                    tfma.MetricConfig(class_name="ExampleCount"),
                    tfma.MetricConfig(
                        class_name="SparseCategoricalAccuracy",
                        # The blessing looks at the overall slice only; the others are reported.
                        per_slice_thresholds=[
                            tfma.PerSliceMetricThreshold(
                                slicing_specs=[tfma.SlicingSpec()], threshold=threshold
                            )
                        ],
                    ),
                ]
            )
        ],
    )


def blessing_thresholds(evaluation_config):
    """(accuracy floor, regression tolerance) of an EvalConfig that `eval_config` made, to 6
    decimals (so also of one made before the slack, whose bounds were the config's)."""
    for spec in evaluation_config.metrics_specs:
        for metric in spec.metrics:
            if metric.class_name == "SparseCategoricalAccuracy":
                threshold = metric.per_slice_thresholds[0].threshold
                floor = threshold.value_threshold.lower_bound.value + _BLESSING_SLACK
                tolerance = -threshold.change_threshold.absolute.value - _BLESSING_SLACK
                return round(floor, 6), round(tolerance, 6)
    raise ValueError("the EvalConfig has no SparseCategoricalAccuracy threshold")


def _span_range(span):
    """ExampleGen's RangeConfig for ingesting span `span` only (None: the newest span)."""
    if span is None:
        return None
    return tfx.proto.RangeConfig(
        static_range=tfx.proto.StaticRange(start_span_number=span, end_span_number=span)
    )


def _trainer(config, examples):
    """The stock Trainer, or the multi-worker one when `config` asks for several workers."""
    trainer_args = dict(
        run_fn=TRAINER_RUN_FN,
        examples=examples,
        train_args=tfx.proto.TrainArgs(splits=["train"], num_steps=config.train_steps or 0),
        eval_args=tfx.proto.EvalArgs(splits=["eval"], num_steps=config.eval_steps or 0),
        custom_config={**config.trainer_custom_config(), "code_digest": training_code_digest()},
    )
    if config.uses_multiworker_trainer:
        return MultiWorkerTrainer(config.multiworker_config(), **trainer_args).with_id("Trainer")
    return tfx.components.Trainer(**trainer_args)


def create_pipeline(config, metadata_connection_config=None, beam_pipeline_args=None):
    """The whole pipeline for `config` (a `pipeline.configs.PipelineConfig`)."""
    example_gen = ImageExampleGen(
        input_base=config.data_dir,
        image_shape=(config.image_size, config.image_size, 1),
        range_config=_span_range(config.span),
        span_window=config.span_window,
        max_bad_files=config.max_bad_files,
    )
    validation = build_validation(example_gen.outputs["examples"], num_classes=config.num_classes)

    trainer = _trainer(config, example_gen.outputs["examples"])
    trainer.add_upstream_node(validation.gate)

    # The baseline: the newest model that PushApproval approved (pushed to serving), not merely
    # the Evaluator's newest blessed one, which ModelCheck may have refused or the push failed.
    baseline = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(
            type=tfx.types.standard_artifacts.ModelBlessing,
            producer_component_id=APPROVAL_ID,
            output_key="approval",
        ),
    ).with_id("latest_blessed_model_resolver")

    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=baseline.outputs["model"],
        eval_config=eval_config(config),
        example_splits=["eval"],
    )
    model_check = ModelCheck(
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        timeout_s=config.model_check_timeout_s,
    ).with_id(MODEL_CHECK_ID)
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        infra_blessing=model_check.outputs["infra_blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=config.serving_dir)
        ),
        custom_executor_spec=executor_spec.ExecutorClassSpec(atomic_pusher.Executor),
    )
    approval = PushApproval(
        model=trainer.outputs["model"], pushed_model=pusher.outputs["pushed_model"]
    ).with_id(APPROVAL_ID)
    components = [
        example_gen,
        *validation.components(),
        trainer,
        baseline,
        evaluator,
        model_check,
        pusher,
        approval,
    ]
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=config.pipeline_root,
        components=components,
        enable_cache=config.enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=beam_pipeline_args or config.beam_pipeline_args(),
    )
