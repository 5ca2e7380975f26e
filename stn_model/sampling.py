"""Bilinear sampling of NHWC images at normalized grid coordinates (PyTorch's grid_sample).

Two implementations of one meaning. On CPU, `bilinear_sample` runs the native ops of
`stn_model.native` (bilinear_sampler.cc, forward and backward, built by `python -P -m
stn_model.native.build`). It falls back to the pure-TF path when the library is not built or
`STN_NATIVE_SAMPLER=0`, when a GPU is visible, inside XLA compilation (jit_compile=True), and
while a SavedModel is traced (`tf.saved_model.save`, or the `portable_ops()` scope): TF Serving
and fresh processes cannot run the custom op. The choice is made when a function is traced: a
tf.function traced outside XLA keeps the native op when a jit_compile function calls it later,
and XLA refuses it; trace it within `portable_ops()`.

The pure-TF path pads the image with one pixel of zeros, so that the four taps of every sample
point that can touch the image lie inside the padded image: one index per point (its top-left
tap) and four fixed offsets address them, with no per-tap masks. The taps are kept for the
hand-written backward pass, which takes the grid gradient from them and scatters the upstream
gradient into the padded image with segment sums. In both paths the bilinear weights come from
the unclipped coordinates, and half-precision inputs are computed in float32 and cast back.

Non-finite grid coordinates, in both paths: +-inf lies outside the image (0 under "zeros", the
edge pixel under "border", zero grid gradient), while NaN samples NaN in every channel and has a
NaN grid gradient (and adds nothing to the image gradient), so a localization net that diverged
shows up as a NaN loss instead of a blank image. (PyTorch's CPU kernel gives NaN too; its CUDA
and MPS kernels do not agree.) What the static shapes leave open (the rank, the last grid
dimension, the batch size, a positive height and width) is checked when the function runs; XLA
(jit_compile) ignores the batch size and the height and width checks, assertions.
"""

import contextlib
import contextvars

import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util
from tensorflow.python.saved_model import save_context

from stn_model import native
from stn_model.checks import check_bool

PADDING_MODES = ("zeros", "border")
_PORTABLE = contextvars.ContextVar("stn_portable_ops", default=False)


def _checked(images, grid, padding_mode):
    """(images, grid), after raising ValueError for what the static shapes show wrong and adding
    run-time checks of what they leave open: the rank, the last grid dimension, the batch size,
    a positive height and width."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if not images.dtype.is_floating:
        raise ValueError(f"images must have a floating dtype, got {images.dtype.name}")
    if not grid.dtype.is_floating:
        raise ValueError(f"grid must have a floating dtype, got {grid.dtype.name}")
    if images.shape.rank not in (None, 4):
        raise ValueError(f"images must have shape [B, H, W, C], got {images.shape}")
    if grid.shape.rank not in (None, 4) or grid.shape[-1] not in (None, 2):
        raise ValueError(f"grid must have shape [B, H', W', 2], got {grid.shape}")
    if 0 in images.shape[1:3]:
        raise ValueError(f"images must have a positive height and width, got {images.shape}")
    batches = (images.shape[0], grid.shape[0])
    if None not in batches and batches[0] != batches[1]:
        raise ValueError(
            f"images and grid must have the same batch size, got {images.shape} and {grid.shape}"
        )
    if images.shape.rank is None:
        images = tf.ensure_shape(images, [None] * 4, name="images")
    if grid.shape[-1] is None:
        grid = tf.ensure_shape(grid, [None, None, None, 2], name="grid")
    checks = []
    if None in batches:
        checks.append(
            tf.debugging.assert_equal(
                tf.shape(images)[0],
                tf.shape(grid)[0],
                message="images and grid must have the same batch size",
            )
        )
    if None in images.shape[1:3]:
        checks.append(
            tf.debugging.assert_positive(
                tf.shape(images)[1:3], message="images must have a positive height and width"
            )
        )
    if checks:
        with tf.control_dependencies(checks):
            grid = tf.identity(grid)
    return images, grid


def _compute_dtype(images, grid):
    if tf.float64 in (images.dtype, grid.dtype):
        return tf.float64
    return tf.float32


def _source_coordinate(coord, size, padding_mode, align_corners):
    """Pixel coordinate of a normalized one, and its derivative with respect to it."""
    size = tf.cast(size, coord.dtype)
    if padding_mode == "border":
        # Every point beyond +-2 clamps to the edge: keep +-inf off the 0 scale of a one-pixel
        # axis under align_corners (inf * 0 is NaN).
        coord = tf.clip_by_value(coord, -2.0, 2.0)
    if align_corners:
        scale = (size - 1.0) * 0.5
        pixel = (coord + 1.0) * scale
    else:
        scale = size * 0.5
        pixel = (coord + 1.0) * scale - 0.5
    if padding_mode == "border":
        # PyTorch's clip_coordinates_set_grad: the derivative is zero on and beyond the edges.
        inside = (pixel > 0.0) & (pixel < size - 1.0)
        scale = tf.where(inside, scale, tf.zeros_like(scale))
        pixel = tf.clip_by_value(pixel, 0.0, size - 1.0)
    return pixel, scale


def _floor_and_fraction(pixel, size):
    """The integer floor, the unclipped fraction, and whether the floor lies in [-1, size - 1]
    (false for NaN and +-inf); the floor of a point outside is -1, so the cast is safe."""
    inside = (pixel >= -1.0) & (pixel < tf.cast(size, pixel.dtype))
    floor = tf.floor(tf.where(inside, pixel, -tf.ones_like(pixel)))
    return tf.cast(floor, tf.int64), pixel - floor, inside


def _top_left(shape, x0, y0):
    """The rows of the top-left taps x0, y0 [B, H', W'] in the images of `shape` [B, H, W, C]
    padded by one pixel and flattened to [-1, C]; int64, since a batch of big images can have
    more than 2**31 padded pixels (and elements, which the backward pass indexes)."""
    padded_width = shape[2] + 2
    first = tf.range(shape[0]) * (shape[1] + 2) * padded_width
    return tf.reshape(first, [-1, 1, 1]) + (y0 + 1) * padded_width + x0 + 1


def _sample(images, x, y, scale_x, scale_y, nan):
    """Bilinear sample of images [B, H, W, C] at pixel coordinates x, y [B, H', W'] (NaN where
    the bool `nan` [B, H', W'] is true)."""
    shape = tf.shape(images, out_type=tf.int64)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    x0, fx, x_in = _floor_and_fraction(x, width)
    y0, fy, y_in = _floor_and_fraction(y, height)
    # A point touches the image iff its top-left tap lies in [-1, size - 1] on both axes; then all
    # four taps lie in the image padded by one pixel of zeros. Other points sample zero (their
    # weights are zero), or NaN where a coordinate is NaN: `missed` is added to the output and
    # the grid gradient, so NaN spreads to the loss but not into the image gradient.
    touches = x_in & y_in & ~nan  # under XLA, border clipping turns NaN into 0
    missed = tf.cast(tf.where(nan, float("nan"), 0.0), x.dtype)
    padded_width = width + 2
    top_left = _top_left(shape, x0, y0)
    offsets = [0, 1, padded_width, padded_width + 1]
    padded = tf.reshape(tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]]), [-1, channels])
    t00, t01, t10, t11 = (tf.gather(padded, top_left + offset) for offset in offsets)
    zero = tf.zeros_like(fx)
    fx, fy = tf.where(touches, fx, zero), tf.where(touches, fy, zero)
    gx, gy = tf.where(touches, 1.0 - fx, zero), 1.0 - fy
    w00, w01, w10, w11 = (w[..., None] for w in (gx * gy, fx * gy, gx * fy, fx * fy))
    output = w00 * t00 + w01 * t01 + w10 * t10 + w11 * t11 + missed[..., None]

    def backward(upstream):
        # Scalar segment sums into the padded image, one per tap: element (tap, channel).
        elements = top_left[..., None] * channels + tf.range(channels)
        padded_grad = tf.add_n(
            [
                tf.math.unsorted_segment_sum(
                    tf.reshape(weight * upstream, [-1]),
                    tf.reshape(elements + offset * channels, [-1]),
                    tf.size(padded, out_type=tf.int64),
                )
                for weight, offset in zip((w00, w01, w10, w11), offsets, strict=True)
            ]
        )
        padded_grad = tf.reshape(padded_grad, [batch, height + 2, padded_width, channels])
        images_grad = padded_grad[:, 1:-1, 1:-1, :]
        d_dx = gy[..., None] * (t01 - t00) + fy[..., None] * (t11 - t10)
        d_dy = gx[..., None] * (t10 - t00) + fx[..., None] * (t11 - t01)
        touching = tf.cast(touches, upstream.dtype)
        x_grad = tf.reduce_sum(upstream * d_dx, axis=-1) * touching * scale_x + missed
        y_grad = tf.reduce_sum(upstream * d_dy, axis=-1) * touching * scale_y + missed
        return images_grad, x_grad, y_grad

    return output, backward


@contextlib.contextmanager
def portable_ops():
    """Within this scope `bilinear_sample` traces the pure-TF path: for SavedModels.

    TF Serving and processes that never loaded the native library cannot run its op, so what is
    saved must not contain it. `tf.saved_model.save` (and Keras' SavedModel format) trace in the
    pure-TF path by themselves; this scope is for functions traced before the save.
    """
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


def _native_library():
    """The native op library when it applies here, else None (see the module docstring)."""
    if (
        _PORTABLE.get()
        or save_context.in_save_context()
        or control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())
        or tf.config.get_visible_devices("GPU")
    ):
        return None
    return native.load()


def bilinear_sample(images, grid, padding_mode="zeros", align_corners=False):
    """Samples images [B, H, W, C] at grid [B, H', W', 2] of normalized (x, y); -> [B, H', W', C].

    Same meaning as PyTorch's `F.grid_sample(mode="bilinear")`: taps outside the image read zero
    ("zeros"), or the coordinates are first clamped to the image ("border"). The bilinear weights
    come from the unclipped coordinates, so the gradients are exact at the borders too. The
    result has the dtype of images; grid may have another floating dtype. A NaN coordinate
    samples NaN, +-inf lies outside the image (the module docstring).
    """
    align_corners = check_bool(align_corners, "align_corners")
    images = tf.convert_to_tensor(images)
    grid = tf.convert_to_tensor(grid, dtype_hint=images.dtype)
    images, grid = _checked(images, grid, padding_mode)
    library = _native_library()
    if library is None:
        return _pure_sample(images, grid, padding_mode, align_corners)
    if images.dtype == grid.dtype:
        return library.stn_bilinear_sample(
            images, grid, padding_mode=padding_mode, align_corners=align_corners
        )
    # Mixed dtypes: sample in the compute dtype; the casts' gradients cast back.
    compute_dtype = _compute_dtype(images, grid)
    output = library.stn_bilinear_sample(
        tf.cast(images, compute_dtype),
        tf.cast(grid, compute_dtype),
        padding_mode=padding_mode,
        align_corners=align_corners,
    )
    return tf.cast(output, images.dtype)


def _pure_sample(images, grid, padding_mode, align_corners):
    """The pure-TF path: TF ops only, so XLA compiles it and any device runs it."""
    compute_dtype = _compute_dtype(images, grid)
    output_dtype, grid_dtype = images.dtype, grid.dtype

    @tf.custom_gradient
    def sample(images, grid):
        shape = tf.shape(images)
        values = tf.cast(images, compute_dtype)
        coords = tf.cast(grid, compute_dtype)
        x, scale_x = _source_coordinate(coords[..., 0], shape[2], padding_mode, align_corners)
        y, scale_y = _source_coordinate(coords[..., 1], shape[1], padding_mode, align_corners)
        nan = tf.reduce_any(tf.math.is_nan(coords), axis=-1)
        output, backward = _sample(values, x, y, scale_x, scale_y, nan)

        def grad(upstream):
            images_grad, x_grad, y_grad = backward(tf.cast(upstream, compute_dtype))
            grid_grad = tf.stack([x_grad, y_grad], axis=-1)
            return tf.cast(images_grad, output_dtype), tf.cast(grid_grad, grid_dtype)

        return tf.cast(output, output_dtype), grad

    return sample(images, grid)
