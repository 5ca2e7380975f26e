"""Rotation equivariance: a training signal for spatial transformers that needs no labels.

If a transformer finds the transform M(x) for an image x (M maps the output grid into x) and
x' is x turned by a known angle d about its centre, then M(x') = R(d) M(x) makes it write the
same image for both: whatever it undoes in x, it undoes in x' as well, and the turn besides.
`equivariance_loss` is the mean squared difference between the two sides, over the
transform's parameters; `with_rotation_equivariance` adds it, weighted, to a model's training
loss, for images turned by random angles. It knows nothing of how the training images were
distorted, only that turns are among the distortions to undo (R and RTS). Jaderberg et al. 2015
train their transformers on the classification loss alone; this signal is not theirs.
"""

import math

import tensorflow as tf
import tf_keras as keras

from stn_model.grids import affine_grid
from stn_model.layers import COMPOSABLE_TRANSFORMS, SpatialTransformer, compose_parameters
from stn_model.models import find_spatial_transformer
from stn_model.sampling import bilinear_sample


def turn_parameters(angles):
    """Flat affine parameters [B, 6] of turns by `angles` [B] (radians) about the centre."""
    cos, sin, zero = tf.cos(angles), tf.sin(angles), tf.zeros_like(angles)
    return tf.stack([cos, -sin, zero, sin, cos, zero], axis=1)


def _turn_as(transform, angles):
    """Turns by `angles` as flat parameters of `transform` (laid out as `identity_parameters`)."""
    affine = turn_parameters(angles)
    if transform == "similarity":  # (a, b, tx, ty) of [[a, -b, tx], [b, a, ty]]
        return tf.gather(affine, [0, 3, 2, 5], axis=1)
    if transform == "projective":
        return tf.concat([affine, tf.zeros_like(affine[:, :2])], axis=1)
    return affine


def turned(images, angles, size=None, align_corners=False):
    """Square images [B, N, N, C] turned by `angles` [B] (radians) about their centre.

    `size` is (N, N), needed where the images' static shape does not say (a generator's).
    The output pixel u reads the input at R(-angle) u, so a point p of the input ends at
    R(angle) p; with 90 degrees that is `np.rot90(image, k=-1)` (x right, y down).
    """
    size = tuple(images.shape[1:3]) if size is None else size
    grid = affine_grid(turn_parameters(-tf.cast(angles, tf.float32)), size, align_corners)
    return bilinear_sample(images, grid, align_corners=align_corners)


def equivariance_loss(transformer, images, angles, training=None):
    """mean((M(turned images) - R(angles) M(images))^2) over the batch and the parameters.

    The gradient flows through the turned side only: the transform found for the image as it
    is serves as a fixed target, so the loss pulls M(x') to it instead of pulling both sides
    together, which a transform shrunk towards a point (zero matrix, zero loss) would do.
    """
    angles = tf.cast(angles, tf.float32)
    found = transformer.find_transform(images, training=training)
    found_turned = transformer.find_transform(
        turned(images, angles, transformer.input_size, transformer.align_corners),
        training=training,
    )
    turn = _turn_as(transformer.transform, angles)
    expected = tf.stop_gradient(compose_parameters(turn, found, transformer.transform))
    return tf.reduce_mean(tf.square(found_turned - expected))


class RotationEquivariance(keras.layers.Layer):
    """Passes images through unchanged; in training it adds `weight * equivariance_loss` of
    `transformer` on them, turned by angles drawn uniformly from +-`max_angle_deg`."""

    def __init__(self, transformer, weight=1.0, max_angle_deg=45.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(transformer, SpatialTransformer):
            raise ValueError(f"transformer must be a SpatialTransformer, got {transformer!r}")
        if transformer.transform not in COMPOSABLE_TRANSFORMS:
            raise ValueError(
                f"rotation equivariance needs a transform of {COMPOSABLE_TRANSFORMS}, "
                f"got {transformer.transform!r}"
            )
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        if not 0 < max_angle_deg <= 180:
            raise ValueError(f"max_angle_deg must be in (0, 180], got {max_angle_deg}")
        self.transformer = transformer
        self.weight = float(weight)
        self.max_angle = math.radians(max_angle_deg)

    def build(self, input_shape):
        height, width = tf.TensorShape(input_shape)[1:3]
        if height is None or height != width:
            raise ValueError(f"rotation equivariance needs square images, got {input_shape}")
        super().build(input_shape)

    def call(self, images, training=None):
        if training:
            angles = tf.random.uniform([tf.shape(images)[0]], -self.max_angle, self.max_angle)
            self.add_loss(self.weight * equivariance_loss(self.transformer, images, angles, True))
        return images


def with_rotation_equivariance(model, weight=1.0, max_angle_deg=45.0):
    """A model to train in place of `model` (one top-level SpatialTransformer, square inputs):
    same weights and outputs, and in training the loss of `RotationEquivariance` on its inputs.
    """
    inputs = keras.Input(model.input_shape[1:], name="images")
    regularized = RotationEquivariance(
        find_spatial_transformer(model), weight, max_angle_deg, name="rotation_equivariance"
    )(inputs)
    return keras.Model(inputs, model(regularized), name=f"{model.name}_equivariant")
