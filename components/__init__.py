"""Custom TFX components of the STN pipeline."""

import os

# Keras 2 (tf_keras) everywhere: set before anything imports TensorFlow.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
