"""The `SpatialTransformer` Keras layer (Jaderberg et al. 2015, arXiv 1506.02025, Sec. 3).

A spatial transformer is three parts: a localization network that looks at the input and
regresses the parameters of a transform, a grid generator that maps every output pixel to a
sampling point in the input, and a sampler that reads the input bilinearly at those points.
This layer takes the localization network's feature extractor from the caller and adds the
regression head itself, started at the identity transform (zero kernel, identity bias, the
paper's advice), so any Keras layer or model that maps images to features can be passed in.

With `iterations=N > 1` the layer refines its transform the inverse compositional way of Lin
& Lucey 2017 ("Inverse Compositional Spatial Transformer Networks", arXiv 1612.03897): it
warps the input with the transform found so far, runs the same localization net and head on
the warped image, and composes the correction it predicts with the transform, N times in all.
Two thin-plate splines do not compose to one, so a TPS transformer finds an affine transform
that way in its first N - 1 passes (with a head of its own) and the spline in the last, on
the image that affine rectified; the spline's targets are then mapped through the affine,
which gives the composed warp exactly (a TPS reproduces affine maps, so the spline of mapped
targets is the mapped spline). Every warp reads the original input, so the image is
resampled once per pass, never a resampled image again.
"""

import numpy as np
import tensorflow as tf
import tf_keras as keras

from stn_model.checks import check_bool, check_int, check_size
from stn_model.grids import (
    affine_grid,
    projective_grid,
    similarity_grid,
    similarity_matrices,
    tps_control_points,
    tps_grid,
)
from stn_model.sampling import PADDING_MODES, bilinear_sample

TRANSFORMS = ("affine", "similarity", "projective", "tps")
COMPOSABLE_TRANSFORMS = ("affine", "similarity", "projective")


def identity_parameters(transform, tps_grid_size=4):
    """The flat parameter vector of the identity transform, float32.

    affine: the 2x3 matrix [[1, 0, 0], [0, 1, 0]] row by row (6 values); similarity: (a, b,
    tx, ty) = (1, 0, 0, 0) (see `grids.similarity_matrices`); projective: the 3x3 homography
    row by row without its last entry, which is fixed at 1 (8 values); tps: the (x, y) targets
    of the K x K control points, equal to the points themselves (2*K*K values).
    """
    if transform == "affine":
        return np.array([1, 0, 0, 0, 1, 0], dtype=np.float32)
    if transform == "similarity":
        return np.array([1, 0, 0, 0], dtype=np.float32)
    if transform == "projective":
        return np.array([1, 0, 0, 0, 1, 0, 0, 0], dtype=np.float32)
    if transform == "tps":
        return tps_control_points(tps_grid_size, dtype=np.float32).ravel()
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


_GRID_GENERATORS = {
    "affine": affine_grid,
    "similarity": similarity_grid,
    "projective": projective_grid,
    "tps": tps_grid,
}


def compose_parameters(outer, inner, transform):
    """The flat parameters [B, P] of the transform `outer` after `inner` (`COMPOSABLE_TRANSFORMS`).

    A grid point u goes to outer(inner(u)): with homogeneous matrices, M = M_outer @ M_inner,
    the projective one rescaled so that its last entry is 1 again. Two similarities compose
    to a similarity, whose (a, b, tx, ty) are read back from the composed affine matrix.
    """
    if transform not in COMPOSABLE_TRANSFORMS:
        raise ValueError(f"transform must be one of {COMPOSABLE_TRANSFORMS}, got {transform!r}")
    if transform == "similarity":
        outer, inner = (tf.reshape(similarity_matrices(p), [-1, 6]) for p in (outer, inner))
        return tf.gather(compose_parameters(outer, inner, "affine"), [0, 3, 2, 5], axis=1)
    composed = tf.matmul(_homogeneous(outer, transform), _homogeneous(inner, transform))
    flat = tf.reshape(composed, [-1, 9])
    if transform == "affine":
        return flat[:, :6]
    return flat[:, :8] / flat[:, 8:]


def _homogeneous(parameters, transform):
    """Flat parameters [B, 6 or 8] -> 3 x 3 matrices [B, 3, 3]."""
    batch = tf.shape(parameters)[0]
    last = [0.0, 0.0, 1.0] if transform == "affine" else [1.0]
    tail = tf.tile(tf.constant([last], dtype=parameters.dtype), [batch, 1])
    return tf.reshape(tf.concat([parameters, tail], axis=1), [-1, 3, 3])


def _identity_head(identity, name):
    """The regression head: float32 Dense, zero kernel, bias `identity` (the paper's advice)."""
    return keras.layers.Dense(
        identity.size,
        kernel_initializer="zeros",
        bias_initializer=keras.initializers.Constant(identity),
        dtype="float32",
        name=name,
    )


def _affine_map(affine, points):
    """Flat points [B, 2*N] (x, y pairs) mapped by flat affine parameters [B, 6]: [B, 2*N]."""
    matrices = tf.reshape(affine, [-1, 2, 3])
    pairs = tf.reshape(points, [tf.shape(points)[0], -1, 2])
    mapped = tf.einsum("bnk,bjk->bnj", pairs, matrices[:, :, :2]) + matrices[:, None, :, 2]
    return tf.reshape(mapped, tf.shape(points))


@keras.saving.register_keras_serializable(package="stn_model")
class SpatialTransformer(keras.layers.Layer):
    """Warps its input images [B, H, W, C] to [B, out_h, out_w, C] with a learned transform.

    Args:
      localization_net: a Keras layer or model mapping the input images to features (any
        shape; they are flattened). The layer adds the regression head on top: a float32
        Dense layer with as many units as the transform has parameters (affine 6,
        similarity 4, projective 8, tps 2*K*K), zero kernel and identity bias.
      output_size: (height, width) of the rectified output.
      transform: "affine", "similarity" (rotation, uniform scale and translation: the
        paper's Sec. 3.1 notes that a transform may be constrained), "projective" or "tps"
        (thin-plate spline on a K x K grid of control points, K = tps_grid_size).
      tps_grid_size: K >= 2 for transform="tps" (ignored and not checked otherwise).
      padding_mode: where the grid leaves the input: "zeros" reads 0, "border" the nearest
        edge pixel.
      align_corners: the sampling convention of PyTorch's `F.grid_sample`. With the default
        False, the identity transform and output_size equal to the input size read every
        pixel at its centre, so they return the input (to float32 rounding of the grid).
      iterations: passes of the localization net (the module docstring; with more than 1, a
        TPS transformer adds a 6-unit affine head, `affine_head`, for its first N - 1); more
        than 1 needs inputs of a fixed height and width.

    Under mixed precision the localization net runs in the compute dtype, the head and the
    grid in float32 (small errors in the transform move every pixel), and the sampling takes
    and returns the compute dtype (computing in float32, as `bilinear_sample` does).

    `rectify(images)` returns (rectified, transform parameters, grid) for visualization;
    `stn_model.models.rectifier(model)` builds the sub-model input -> rectified image.
    """

    def __init__(
        self,
        localization_net,
        output_size,
        transform="affine",
        tps_grid_size=4,
        padding_mode="zeros",
        align_corners=False,
        iterations=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(localization_net, keras.layers.Layer):
            kind = type(localization_net)
            keras_3 = kind.__module__.split(".")[0] == "keras"
            raise ValueError(
                "localization_net must be a tf_keras (Keras 2) layer or model mapping images to "
                f"features, got {'a Keras 3 ' if keras_3 else ''}{kind.__name__}"
            )
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if transform == "tps":
            tps_grid_size = check_int(tps_grid_size, "tps_grid_size", minimum=2)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        iterations = check_int(iterations, "iterations")
        self.localization_net = localization_net
        self.output_size = check_size(output_size)
        self.transform = transform
        self.tps_grid_size = tps_grid_size
        self.padding_mode = padding_mode
        self.align_corners = check_bool(align_corners, "align_corners")
        self.iterations = iterations
        identity = identity_parameters(transform, tps_grid_size)
        self.flatten = keras.layers.Flatten(name="features")
        self.head = _identity_head(identity, "transform_head")
        # A TPS refined over passes finds an affine transform first (the module docstring).
        self.affine_head = (
            _identity_head(identity_parameters("affine"), "affine_head")
            if transform == "tps" and iterations > 1
            else None
        )
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self.input_size = None

    def build(self, input_shape):
        height, width = tf.TensorShape(input_shape)[1:3]
        if self.iterations > 1 and None in (height, width):
            raise ValueError(
                f"iterations > 1 needs inputs of a fixed height and width, got {input_shape}"
            )
        self.input_size = (height, width)
        if self.iterations > 1:  # the later passes warp to this size
            self.input_spec = keras.layers.InputSpec(ndim=4, axes={1: height, 2: width})
        super().build(input_shape)

    def transform_parameters(self, images, training=None, head=None):
        """The flat transform parameters [B, P] (float32) `head` (default: the head of the
        layer's transform) predicts for `images`."""
        features = self.flatten(self.localization_net(images, training=training))
        return (self.head if head is None else head)(features)

    def rectify(self, images, training=None):
        """(rectified [B, out_h, out_w, C], parameters [B, P] float32, grid [B, out_h, out_w, 2]).

        The grid holds normalized (x, y) input coordinates in [-1, 1] for every output pixel
        (PyTorch's convention), float32; the parameters are laid out as in
        `identity_parameters`.
        """
        images = tf.cast(images, self.compute_dtype)
        parameters = self.find_transform(images, training=training)
        rectified, grid = self._warp(images, parameters, self.output_size, self.transform)
        return rectified, parameters, grid

    def find_transform(self, images, training=None):
        """The parameters [B, P] (float32) of the transform all passes find for `images`,
        laid out as in `identity_parameters`; `rectify` without the sampling. A layer not yet
        called is built for the shape of `images`."""
        images = tf.cast(images, self.compute_dtype)
        if not self.built:
            self.build(images.shape)
        if self.affine_head is None:
            return self._refine(images, self.head, self.transform, self.iterations, training)
        affine = self._refine(images, self.affine_head, "affine", self.iterations - 1, training)
        warped, _ = self._warp(images, affine, self.input_size, "affine")
        targets = self.transform_parameters(warped, training=training)
        return _affine_map(affine, targets)

    def _refine(self, images, head, transform, passes, training):
        """The parameters `head` finds in `passes` inverse compositional passes."""
        parameters = self.transform_parameters(images, training=training, head=head)
        for _ in range(passes - 1):
            warped, _ = self._warp(images, parameters, self.input_size, transform)
            correction = self.transform_parameters(warped, training=training, head=head)
            parameters = compose_parameters(parameters, correction, transform)
        return parameters

    def _warp(self, images, parameters, size, transform):
        """(images sampled on the grid of `transform` and `size`, that grid)."""
        generate = _GRID_GENERATORS[transform]
        grid = generate(parameters, size, align_corners=self.align_corners)
        # The grid stays float32: float16 would round coordinates (1/8 px steps at 224 px).
        warped = bilinear_sample(
            images,
            grid,
            padding_mode=self.padding_mode,
            align_corners=self.align_corners,
        )
        return warped, grid

    def call(self, inputs, training=None):
        return self.rectify(inputs, training=training)[0]

    def compute_output_shape(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        return tf.TensorShape([input_shape[0], *self.output_size, input_shape[-1]])

    def get_config(self):
        config = super().get_config()
        config.update(
            localization_net=keras.layers.serialize(self.localization_net),
            output_size=list(self.output_size),
            transform=self.transform,
            tps_grid_size=self.tps_grid_size,
            padding_mode=self.padding_mode,
            align_corners=self.align_corners,
            iterations=self.iterations,
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["localization_net"] = keras.layers.deserialize(
            config["localization_net"], custom_objects=custom_objects
        )
        return cls(**config)
