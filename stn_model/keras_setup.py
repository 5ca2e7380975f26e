"""Process-wide set-up for training with Keras 2 (`tf_keras`) in this TensorFlow."""


def skip_autograph_of_tf_keras():
    """Stop AutoGraph from converting tf_keras' own code (its training loop, losses, metrics).

    TensorFlow's AutoGraph leaves the modules `tensorflow` and `keras` alone (its
    `CONVERSION_RULES`) but not `tf_keras`, the same Keras 2 code under a new name, so every new
    process spent 40-65 s converting Keras internals before its first training step (measured
    here: a 10-unit Dense model's first `fit` took 67 s, 2.1 s with this rule). Keras 2 was
    written to run unconverted, as it always did under the name `keras`. Idempotent.
    """
    from tensorflow.python.autograph.core import config

    rule = config.DoNotConvert("tf_keras")
    if not any(getattr(r, "_prefix", None) == "tf_keras" for r in config.CONVERSION_RULES):
        config.CONVERSION_RULES = (rule, *config.CONVERSION_RULES)
