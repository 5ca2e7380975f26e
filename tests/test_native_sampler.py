"""The native sampler ops against the pure-TF path and SciPy; the fallbacks; portable exports."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from test_sampling import MODES, random_affine, random_homography, reference_sample

from stn_model import SpatialTransformer, affine_grid, bilinear_sample, native, projective_grid
from stn_model.native.build import BUILD_COMMAND
from stn_model.sampling import _pure_sample, portable_ops
from stn_model.serving import export_saved_model

LIBRARY = native.load()
needs_native = pytest.mark.skipif(
    LIBRARY is None, reason=f"native sampler not built: run `{BUILD_COMMAND}`"
)
OPS = (b"StnBilinearSample", b"StnBilinearSampleGrad")


def native_sample(images, grid, padding_mode="zeros", align_corners=False):
    return LIBRARY.stn_bilinear_sample(
        images, grid, padding_mode=padding_mode, align_corners=align_corners
    )


def gradients(sample, images, grid, weights, *args):
    """(output, images_grad, grid_grad) of sum(sample(images, grid) * weights)."""
    images, grid = tf.convert_to_tensor(images), tf.convert_to_tensor(grid)
    with tf.GradientTape() as tape:
        tape.watch([images, grid])
        out = sample(images, grid, *args)
        loss = tf.reduce_sum(tf.cast(out, weights.dtype) * weights)
    return (out, *tape.gradient(loss, [images, grid]))


def op_types(function, *args):
    return {op.type for op in function.get_concrete_function(*args).graph.get_operations()}


@needs_native
@pytest.mark.parametrize(("padding_mode", "align_corners"), MODES)
@pytest.mark.parametrize(("channels", "projective"), [(3, False), (1, True)])
def test_native_matches_pure_tf_and_scipy(padding_mode, align_corners, channels, projective):
    rng = np.random.default_rng(10)
    images = rng.normal(size=(3, 9, 7, channels))
    if projective:
        grid = projective_grid(random_homography(rng, 3), (6, 11), align_corners).numpy()
    else:
        grid = affine_grid(random_affine(rng, 3), (6, 11), align_corners).numpy()
    assert np.abs(grid).max() > 1.2  # some points beyond the image
    weights = tf.constant(rng.normal(size=(3, 6, 11, channels)))
    args = (images, grid, weights, padding_mode, align_corners)
    ours = gradients(native_sample, *args)
    pure = gradients(_pure_sample, *args)
    expected = reference_sample(images, grid, padding_mode, align_corners)
    np.testing.assert_allclose(ours[0], expected, atol=1e-12, rtol=0)
    for a, b in zip(ours, pure, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)


@needs_native
@pytest.mark.parametrize(("padding_mode", "align_corners"), MODES)
def test_native_gradients_match_central_differences(padding_mode, align_corners):
    rng = np.random.default_rng(11)
    images = rng.normal(size=(2, 4, 5, 2))
    grid = rng.uniform(-1.4, 1.4, size=(2, 3, 4, 2))  # inside, on the margin and beyond
    weights = rng.normal(size=(2, 3, 4, 2))

    def loss(images, grid):
        return float(np.sum(native_sample(images, grid, padding_mode, align_corners) * weights))

    _, images_grad, grid_grad = gradients(
        native_sample, images, grid, tf.constant(weights), padding_mode, align_corners
    )
    eps = 1e-6
    expected_grid = np.zeros_like(grid)
    for index in np.ndindex(grid.shape):
        step = np.zeros_like(grid)
        step[index] = eps
        expected_grid[index] = (loss(images, grid + step) - loss(images, grid - step)) / (2 * eps)
    np.testing.assert_allclose(grid_grad, expected_grid, atol=1e-7)
    # The loss is linear in the images: a few random directions check the whole gradient.
    for direction in rng.normal(size=(3, *images.shape)):
        expected = (loss(images + eps * direction, grid) - loss(images - eps * direction, grid)) / (
            2 * eps
        )
        np.testing.assert_allclose(np.sum(images_grad * direction), expected, atol=1e-7)


@needs_native
@pytest.mark.parametrize(("padding_mode", "align_corners"), MODES)
def test_native_second_order_and_forward_mode_derivatives(padding_mode, align_corners):
    # A gradient penalty differentiates the backward op: against central differences of it.
    rng = np.random.default_rng(12)
    images = tf.constant(rng.normal(size=(2, 4, 5, 2)))
    grid = tf.constant(rng.uniform(-1.4, 1.4, size=(2, 3, 4, 2)))
    weights = tf.constant(rng.normal(size=(2, 3, 4, 2)))
    args = (padding_mode, align_corners)

    def penalty(images, grid):
        _, images_grad, grid_grad = gradients(native_sample, images, grid, weights, *args)
        return tf.reduce_sum(tf.sin(images_grad)) + tf.reduce_sum(tf.sin(grid_grad))

    with tf.GradientTape() as tape:
        tape.watch([images, grid])
        value = penalty(images, grid)
    derivatives = tape.gradient(value, [images, grid])
    eps = 1e-6
    for _ in range(3):
        steps = [rng.normal(size=images.shape), rng.normal(size=grid.shape)]
        ahead = penalty(images + eps * steps[0], grid + eps * steps[1])
        behind = penalty(images - eps * steps[0], grid - eps * steps[1])
        along = sum(np.sum(d * step) for d, step in zip(derivatives, steps, strict=True))
        np.testing.assert_allclose(along, (ahead - behind) / (2 * eps), rtol=1e-6, atol=1e-8)
    with tf.autodiff.ForwardAccumulator(grid, tf.ones_like(grid)) as accumulator:
        output = native_sample(images, grid, *args)
    with tf.autodiff.ForwardAccumulator(grid, tf.ones_like(grid)) as reference:
        pure = _pure_sample(images, grid, *args)
    np.testing.assert_allclose(accumulator.jvp(output), reference.jvp(pure), atol=1e-12)


@needs_native
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(tf.float16, 1e-3), (tf.bfloat16, 1e-2), (tf.float32, 1e-6), (tf.float64, 1e-12)],
)
def test_native_dtypes_match_pure_tf(dtype, tolerance):
    rng = np.random.default_rng(12)
    images = tf.constant(rng.uniform(-1, 1, size=(2, 8, 6, 3)), dtype)
    grid = tf.constant(affine_grid(random_affine(rng, 2), (5, 4)).numpy(), dtype)
    weights = tf.ones([2, 5, 4, 3])
    ours = gradients(native_sample, images, grid, weights, "border", True)
    pure = gradients(_pure_sample, images, grid, weights, "border", True)
    for a, b in zip(ours, pure, strict=True):
        assert a.dtype == dtype
        # Both compute in float32 (float64 for float64): they differ by the final rounding.
        scale = np.abs(tf.cast(b, tf.float64)).max()
        np.testing.assert_allclose(
            tf.cast(a, tf.float64), tf.cast(b, tf.float64), atol=tolerance * scale
        )


@needs_native
def test_float16_images_with_float32_grid_use_the_native_op():
    rng = np.random.default_rng(13)
    images = tf.constant(rng.uniform(-1, 1, size=(1, 30, 30, 1)), tf.float16)
    grid = tf.constant(rng.uniform(-1, 1, size=(1, 6, 6, 2)), tf.float32)
    weights = tf.ones([1, 6, 6, 1])
    traced = tf.function(lambda i, g: gradients(bilinear_sample, i, g, weights))
    assert set(OPS) <= {t.encode() for t in op_types(traced, images, grid)}
    out, images_grad, grid_grad = traced(images, grid)
    assert (out.dtype, images_grad.dtype, grid_grad.dtype) == (tf.float16, tf.float16, tf.float32)
    expected = reference_sample(tf.cast(images, tf.float64), grid, "zeros", False)
    np.testing.assert_allclose(tf.cast(out, tf.float64), expected, atol=2e-3)


def sample_and_gradients(images, grid, weights):
    return gradients(bilinear_sample, images, grid, weights, "zeros", False)


@needs_native
def test_tf_function_uses_the_native_op_and_xla_the_pure_path():
    rng = np.random.default_rng(14)
    images = tf.constant(rng.normal(size=(3, 12, 9, 3)), tf.float32)
    grid = tf.cast(affine_grid(random_affine(rng, 3), (10, 14)), tf.float32)
    weights = tf.constant(rng.normal(size=(3, 10, 14, 3)), tf.float32)
    graph = tf.function(sample_and_gradients)
    xla = tf.function(sample_and_gradients, jit_compile=True)
    assert set(OPS) <= {t.encode() for t in op_types(graph, images, grid, weights)}
    assert not {t.encode() for t in op_types(xla, images, grid, weights)} & set(OPS)
    for a, b in zip(graph(images, grid, weights), xla(images, grid, weights), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())


@needs_native
def test_a_function_traced_outside_xla_needs_the_portable_scope_to_run_inside_it():
    images, grid = tf.zeros([1, 4, 4, 1]), tf.zeros([1, 3, 3, 2])
    native_traced, portable_traced = tf.function(bilinear_sample), tf.function(bilinear_sample)
    native_traced(images, grid)
    with portable_ops():
        portable_traced(images, grid)
    with pytest.raises(tf.errors.InvalidArgumentError, match="StnBilinearSample"):
        tf.function(lambda i, g: native_traced(i, g), jit_compile=True)(images, grid)
    xla = tf.function(lambda i, g: portable_traced(i, g), jit_compile=True)
    np.testing.assert_array_equal(xla(images, grid), tf.zeros([1, 3, 3, 1]))


@needs_native
def test_unknown_batch_size():
    spec = [tf.TensorSpec([None, 6, 7, 3], tf.float64), tf.TensorSpec([None, 4, 5, 2], tf.float64)]
    weights_spec = tf.TensorSpec([None, 4, 5, 3], tf.float64)
    traced = tf.function(sample_and_gradients, input_signature=[*spec, weights_spec])
    rng = np.random.default_rng(15)
    for batch in (1, 3):
        images = tf.constant(rng.normal(size=(batch, 6, 7, 3)))
        grid = tf.constant(rng.uniform(-1.3, 1.3, (batch, 4, 5, 2)))
        weights = tf.constant(rng.normal(size=(batch, 4, 5, 3)))
        expected = gradients(_pure_sample, images, grid, weights, "zeros", False)
        for a, b in zip(traced(images, grid, weights), expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_environment_variable_and_portable_scope_force_the_pure_path(monkeypatch):
    images, grid = tf.zeros([1, 4, 4, 1]), tf.zeros([1, 3, 3, 2])
    with portable_ops():
        assert not {t.encode() for t in op_types(tf.function(bilinear_sample), images, grid)} & set(
            OPS
        )
    monkeypatch.setenv(native.ENV_VAR, "0")
    assert native.load() is None
    traced = tf.function(sample_and_gradients)
    assert not {t.encode() for t in op_types(traced, images, grid, tf.ones([1, 3, 3, 1]))} & set(
        OPS
    )
    np.testing.assert_array_equal(bilinear_sample(images + 1.0, grid), tf.ones([1, 3, 3, 1]))


def test_a_missing_or_broken_library_warns_once(tmp_path, caplog):
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"not a library")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        for _ in range(2):
            assert native._load(tmp_path / "missing.so") is None
            assert native._load(broken) is None
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "not built" in messages[0]
    assert "did not load" in messages[1]
    assert all(BUILD_COMMAND in message for message in messages)


@pytest.mark.slow
def test_the_build_replaces_a_library_that_does_not_load_only_when_forced(tmp_path, monkeypatch):
    from stn_model.native import build

    source = tmp_path / build.SOURCE.name
    source.write_bytes(build.SOURCE.read_bytes())
    monkeypatch.setattr(build, "SOURCE", source)
    build.library_path.cache_clear()
    try:
        target = build.library_path()
        target.write_bytes(b"cut short")  # the right name, but it does not load
        assert build.main([]) == 0 and target.read_bytes() == b"cut short"
        assert build.main(["--force"]) == 0
        # In a fresh process: this one has the package's library, whose ops are registered.
        check = "import sys, tensorflow as tf; tf.load_op_library(sys.argv[1]).stn_bilinear_sample"
        loaded = subprocess.run(
            [sys.executable, "-c", check, str(target)], capture_output=True, text=True, timeout=120
        )
        assert loaded.returncode == 0, loaded.stderr
    finally:
        build.library_path.cache_clear()


SERVE_IN_A_FRESH_PROCESS = """
import io, sys
import numpy as np
import tensorflow as tf
from PIL import Image
buffer = io.BytesIO()
Image.fromarray(np.full((12, 10), 128, np.uint8)).save(buffer, format="PNG")
loaded = tf.saved_model.load(sys.argv[1])
result = loaded.signatures["serving_default"](images=tf.constant([buffer.getvalue()]))
assert result["probabilities"].shape == (1, 3), result
assert not any(name.startswith("stn_model") for name in sys.modules)
print("served")
"""


def tiny_st_model():
    """images [B, 12, 10, 1] -> a spatial transformer -> probabilities of 3 classes."""
    localization = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(4)])
    return keras.Sequential(
        [
            keras.Input((12, 10, 1)),
            SpatialTransformer(localization, (8, 8)),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


@needs_native
def test_exported_saved_model_has_no_native_op_and_serves_in_a_fresh_process(tmp_path):
    model = tiny_st_model()
    assert "StnBilinearSample" in op_types(tf.function(model), tf.zeros([2, 12, 10, 1]))
    export_dir = str(tmp_path / "export")
    export_saved_model(model, export_dir)
    saved = (tmp_path / "export" / "saved_model.pb").read_bytes()
    assert not any(op in saved for op in OPS)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", SERVE_IN_A_FRESH_PROCESS, export_dir],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served" in result.stdout


@needs_native
def test_keras_saved_model_format_traces_the_pure_path(tmp_path):
    model = tiny_st_model()
    model.save(tmp_path / "keras_saved_model", save_format="tf")
    saved = (tmp_path / "keras_saved_model" / "saved_model.pb").read_bytes()
    assert not any(op in saved for op in OPS)


@needs_native
def test_a_signature_traced_before_the_save_is_portable_only_within_the_scope(tmp_path):
    # README: a concrete function traced before the save keeps the native op in the SavedModel.
    model = tiny_st_model()
    spec = tf.TensorSpec([None, 12, 10, 1])
    native_traced = tf.function(model, input_signature=[spec]).get_concrete_function()
    with portable_ops():
        portable_traced = tf.function(model, input_signature=[spec]).get_concrete_function()
    for name, signature in [("native", native_traced), ("portable", portable_traced)]:
        tf.saved_model.save(model, str(tmp_path / name), signatures=signature)
        saved = (tmp_path / name / "saved_model.pb").read_bytes()
        assert any(op in saved for op in OPS) == (name == "native")
