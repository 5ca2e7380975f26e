"""The STN training pipeline: definition, configuration, runners and the CLI."""

import os

# Keras 2 (tf_keras) everywhere: set before anything imports TensorFlow.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
