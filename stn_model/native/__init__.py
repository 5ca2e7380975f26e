"""The native CPU sampler (bilinear_sampler.cc), loaded lazily; its gradients are registered here.

The backward op's own gradient (for second-order and forward-mode derivatives) is that of the
pure-TF path's backward pass, which computes the same values.

`load()` returns the op library, or None when `STN_NATIVE_SAMPLER=0` is set or the library is
not built or fails to load; in the last two cases it logs one warning naming the build command.
"""

import functools
import logging
import os

import tensorflow as tf

# stn_model.native.build is imported where used, so that `python -m` can run it as __main__.
ENV_VAR = "STN_NATIVE_SAMPLER"
logger = logging.getLogger(__name__)


def load():
    """The op library (StnBilinearSample, StnBilinearSampleGrad), or None: see the module."""
    return None if os.environ.get(ENV_VAR, "1") == "0" else _library()


def _library():
    from stn_model.native.build import library_path

    return _load(library_path())


@functools.cache
def _load(path):
    from stn_model.native.build import BUILD_COMMAND

    if not path.exists():
        logger.warning(
            "The native bilinear sampler is not built: using the slower pure-TF path. "
            "Build it with `%s`.",
            BUILD_COMMAND,
        )
        return None
    try:
        return tf.load_op_library(str(path))
    except (tf.errors.NotFoundError, OSError) as error:
        logger.warning(
            "The native bilinear sampler did not load (%s): using the slower pure-TF path. "
            "Rebuild it with `%s`.",
            error,
            BUILD_COMMAND,
        )
        return None


@tf.RegisterGradient("StnBilinearSample")
def _sample_gradient(op, upstream):
    images, grid = op.inputs
    return _library().stn_bilinear_sample_grad(
        images,
        grid,
        upstream,
        padding_mode=op.get_attr("padding_mode"),
        align_corners=op.get_attr("align_corners"),
    )


@tf.RegisterGradient("StnBilinearSampleGrad")
def _sample_grad_gradient(op, *upstream):
    """The derivatives of the pure-TF backward pass, which the native one equals."""
    from stn_model.sampling import _pure_sample

    images, grid, output_grad = op.inputs
    with tf.GradientTape() as outer:
        outer.watch(op.inputs)
        with tf.GradientTape() as inner:
            inner.watch([images, grid])
            padding_mode = tf.compat.as_str(op.get_attr("padding_mode"))
            output = _pure_sample(images, grid, padding_mode, op.get_attr("align_corners"))
        first = inner.gradient(output, [images, grid], output_gradients=output_grad)
        total = tf.add_n(
            [tf.reduce_sum(f * u) for f, u in zip(first, upstream, strict=True) if u is not None]
        )
    return outer.gradient(total, list(op.inputs))
