"""Spatial Transformer Networks in TensorFlow / Keras 2 (Jaderberg et al., 2015)."""

import os

# Keras 2 (tf_keras) everywhere: TFX 1.16's libraries and MultiWorkerMirroredStrategy need it.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

from stn_model.grids import affine_grid, projective_grid, similarity_grid, tps_grid
from stn_model.layers import SpatialTransformer
from stn_model.models import MODEL_NAMES, build_model, rectifier
from stn_model.sampling import bilinear_sample

__all__ = [
    "MODEL_NAMES",
    "SpatialTransformer",
    "affine_grid",
    "bilinear_sample",
    "build_model",
    "projective_grid",
    "rectifier",
    "similarity_grid",
    "tps_grid",
]
