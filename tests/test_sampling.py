"""bilinear_sample against a SciPy reference, central differences, XLA and tf.function.

Every test runs twice: with the native sampler (skipped when it is not built) and with the
pure-TF path (forced by STN_NATIVE_SAMPLER=0).
"""

import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import map_coordinates

from stn_model import affine_grid, bilinear_sample, native, projective_grid, tps_grid
from stn_model.grids import tps_control_points
from stn_model.native.build import BUILD_COMMAND
from stn_model.sampling import _floor_and_fraction, _top_left

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
MODES = [(padding, align) for padding in ("zeros", "border") for align in (False, True)]


@pytest.fixture(autouse=True, params=["native", "pure-TF"])
def implementation(request, monkeypatch):
    """The sampler under test: the native ops (when built) or the pure-TF path."""
    if request.param == "pure-TF":
        monkeypatch.setenv(native.ENV_VAR, "0")
    elif native.load() is None:
        pytest.skip(f"native sampler not built: run `{BUILD_COMMAND}`")
    return request.param


def pixel_coordinates(coord, size, align_corners):
    """PyTorch's grid_sample convention: normalized [-1, 1] -> pixel index coordinates."""
    if align_corners:
        return (coord + 1.0) / 2.0 * (size - 1)
    return ((coord + 1.0) * size - 1.0) / 2.0


def reference_sample(images, grid, padding_mode, align_corners):
    """Bilinear sampling written with scipy.ndimage.map_coordinates(order=1), in float64.

    zeros: taps outside the image read 0. The image gets one pixel of zeros around it, so a
    point in the margin interpolates between a pixel and a zero; beyond the margin all four
    taps are outside and map_coordinates(mode="constant", cval=0) returns 0, as it should.
    border: the coordinates are clamped to the image first.
    """
    images, grid = np.asarray(images, np.float64), np.asarray(grid, np.float64)
    batch, height, width, channels = images.shape
    x = pixel_coordinates(grid[..., 0], width, align_corners)
    y = pixel_coordinates(grid[..., 1], height, align_corners)
    out = np.empty((*grid.shape[:3], channels))
    for b in range(batch):
        for c in range(channels):
            if padding_mode == "zeros":
                image = np.pad(images[b, ..., c], 1)
                coords = [y[b] + 1.0, x[b] + 1.0]
                out[b, ..., c] = map_coordinates(image, coords, order=1, mode="constant", cval=0.0)
            else:
                coords = [np.clip(y[b], 0, height - 1), np.clip(x[b], 0, width - 1)]
                out[b, ..., c] = map_coordinates(images[b, ..., c], coords, order=1, mode="nearest")
    return out


def random_affine(rng, batch, scale=1.4):
    """Rotations, zooms beyond the borders (scale > 1) and shifts, so taps fall outside."""
    angle = rng.uniform(-np.pi, np.pi, batch)
    zoom = rng.uniform(0.6, scale, batch)
    shift = rng.uniform(-0.4, 0.4, (batch, 2))
    cos, sin = np.cos(angle) * zoom, np.sin(angle) * zoom
    return np.stack(
        [np.stack([cos, -sin, shift[:, 0]], -1), np.stack([sin, cos, shift[:, 1]], -1)], 1
    )


def random_homography(rng, batch):
    theta = np.concatenate([random_affine(rng, batch), np.zeros((batch, 1, 3))], axis=1)
    theta[:, 2] = [0.0, 0.0, 1.0]
    theta[:, 2, :2] = rng.uniform(-0.3, 0.3, (batch, 2))
    return theta


@pytest.mark.parametrize(("padding_mode", "align_corners"), MODES)
@pytest.mark.parametrize("size", [(5, 5), (6, 6), (4, 7), (1, 3)])
def test_identity_reproduces_the_input(size, padding_mode, align_corners):
    images = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
    grid = affine_grid(np.tile(IDENTITY, (2, 1, 1)).astype(np.float32), size, align_corners)
    out = bilinear_sample(images, grid, padding_mode, align_corners)
    np.testing.assert_allclose(out, images, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("padding_mode", "align_corners"), MODES)
def test_random_affine_matches_scipy(padding_mode, align_corners):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 9, 7, 2))
    grid = affine_grid(random_affine(rng, 4), (6, 11), align_corners).numpy()
    assert np.abs(grid).max() > 1.2  # some points beyond the image
    out = bilinear_sample(images, grid, padding_mode, align_corners)
    expected = reference_sample(images, grid, padding_mode, align_corners)
    np.testing.assert_allclose(out, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("padding_mode", "align_corners"), MODES)
def test_random_projective_matches_scipy(padding_mode, align_corners):
    rng = np.random.default_rng(2)
    images = rng.normal(size=(3, 8, 10, 1))
    grid = projective_grid(random_homography(rng, 3), (7, 5), align_corners).numpy()
    out = bilinear_sample(images, grid, padding_mode, align_corners)
    expected = reference_sample(images, grid, padding_mode, align_corners)
    np.testing.assert_allclose(out, expected, atol=1e-12, rtol=0)


def test_points_on_and_around_the_border_by_hand():
    # One row [1, 2, 3, 4], align_corners=True: pixel x = (gx + 1) * 1.5.
    images = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 4, 1)
    gx = np.array([-1.0 - 1 / 3, -1.0 - 1 / 6, -1.0, 0.0, 1.0, 1.0 + 1 / 6, 1.0 + 2 / 3])
    grid = np.stack([gx, np.zeros_like(gx)], axis=-1).reshape(1, 1, -1, 2)
    zeros = bilinear_sample(images, grid, "zeros", align_corners=True).numpy().ravel()
    np.testing.assert_allclose(zeros, [0.5, 0.75, 1.0, 2.5, 4.0, 3.0, 0.0], atol=1e-12)
    border = bilinear_sample(images, grid, "border", align_corners=True).numpy().ravel()
    np.testing.assert_allclose(border, [1.0, 1.0, 1.0, 2.5, 4.0, 4.0, 4.0], atol=1e-12)


def central_difference(loss, x, direction, eps=1e-6):
    """Derivative of a scalar function of a float64 array along `direction`."""
    return (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)


def numeric_gradient(loss, x):
    """Central differences along every coordinate axis."""
    return np.array([central_difference(loss, x, unit) for unit in np.eye(x.size)]).reshape(x.shape)


def tape_gradient(loss, x):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(x)
    return tape.gradient(value, x).numpy()


GRIDS = {
    "affine": (affine_grid, lambda rng: random_affine(rng, 2)),
    "projective": (projective_grid, lambda rng: random_homography(rng, 2)),
    "tps": (tps_grid, lambda rng: tps_control_points(3) * 1.3 + rng.normal(0, 0.2, (2, 9, 2))),
}


@pytest.mark.parametrize(
    ("transform", "padding_mode", "align_corners"),
    [("affine", *mode) for mode in MODES]
    + [("projective", "zeros", True), ("projective", "border", False)]
    + [("tps", "zeros", False), ("tps", "border", True)],
)
def test_gradients_match_central_differences(transform, padding_mode, align_corners):
    rng = np.random.default_rng(3)
    generate, parameters = GRIDS[transform]
    theta = parameters(rng)
    images = rng.normal(size=(2, 4, 5, 2))
    weights = rng.normal(size=(2, 5, 6, 2))

    def loss(images, theta):
        grid = generate(theta, (5, 6), align_corners)
        out = bilinear_sample(images, grid, padding_mode, align_corners)
        return tf.reduce_sum(out * weights)

    grid = generate(theta, (5, 6), align_corners).numpy()
    assert np.abs(grid).max() > 1.05  # samples near and beyond the borders

    traced_loss = tf.function(loss)  # one trace serves all the finite differences

    def value(images, theta):
        return float(traced_loss(images, theta))

    expected_theta = numeric_gradient(
        lambda t: value(images, t.reshape(theta.shape)), theta.ravel()
    )
    theta_grad = tape_gradient(lambda t: loss(images, t), theta)
    np.testing.assert_allclose(theta_grad.ravel(), expected_theta, atol=1e-7)
    # The loss is linear in the images: a few random directions check the whole gradient.
    images_grad = tape_gradient(lambda i: loss(i, theta), images)
    for direction in rng.normal(size=(3, *images.shape)):
        expected = central_difference(lambda i: value(i, theta), images, direction)
        np.testing.assert_allclose(np.sum(images_grad * direction), expected, atol=1e-7)


def sample_and_gradients(images, grid, weights, padding_mode, align_corners):
    with tf.GradientTape() as tape:
        tape.watch([images, grid])
        out = bilinear_sample(images, grid, padding_mode, align_corners)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * weights)
    return (out, *tape.gradient(loss, [images, grid]))


@pytest.mark.parametrize(("padding_mode", "align_corners"), [("zeros", False), ("border", True)])
def test_xla_and_tf_function_equal_eager(padding_mode, align_corners):
    rng = np.random.default_rng(4)
    images = tf.constant(rng.normal(size=(3, 12, 9, 3)), tf.float32)
    grid = tf.cast(affine_grid(random_affine(rng, 3), (10, 14), align_corners), tf.float32)
    weights = tf.constant(rng.normal(size=(3, 10, 14, 3)), tf.float32)
    args = (images, grid, weights, padding_mode, align_corners)
    eager = sample_and_gradients(*args)
    graph = tf.function(sample_and_gradients)(*args)
    xla = tf.function(sample_and_gradients, jit_compile=True)(*args)
    for a, b, c in zip(eager, graph, xla, strict=True):
        # float32 rounding, relative to the largest value (XLA reorders sums).
        tolerance = 1e-6 * np.abs(a).max()
        np.testing.assert_allclose(b, a, rtol=0, atol=tolerance)
        np.testing.assert_allclose(c, a, rtol=0, atol=tolerance)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_unknown_batch_size(jit_compile):
    spec = [tf.TensorSpec([None, 6, 7, 3], tf.float64), tf.TensorSpec([None, 4, 5, 2], tf.float64)]
    sample = tf.function(bilinear_sample, input_signature=spec, jit_compile=jit_compile)

    def gradients(images, grid, weights):
        return tf.gradients(tf.reduce_sum(bilinear_sample(images, grid) * weights), [images, grid])

    weights_spec = tf.TensorSpec([None, 4, 5, 3], tf.float64)
    traced = tf.function(gradients, input_signature=[*spec, weights_spec], jit_compile=jit_compile)
    rng = np.random.default_rng(5)
    for batch in (1, 3):
        images = tf.constant(rng.normal(size=(batch, 6, 7, 3)))
        grid = tf.constant(rng.uniform(-1.3, 1.3, (batch, 4, 5, 2)))
        weights = tf.constant(rng.normal(size=(batch, 4, 5, 3)))
        expected = reference_sample(images, grid, "zeros", False)
        np.testing.assert_allclose(sample(images, grid), expected, atol=1e-12)
        with tf.GradientTape() as tape:
            tape.watch([images, grid])
            loss = tf.reduce_sum(bilinear_sample(images, grid) * weights)
        eager = tape.gradient(loss, [images, grid])
        for graph_grad, eager_grad in zip(traced(images, grid, weights), eager, strict=True):
            np.testing.assert_allclose(graph_grad, eager_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("images_batch", "grid_batch"), [(1, 3), (3, 1)])
def test_batch_sizes_known_only_at_run_time_must_match(images_batch, grid_batch):
    spec = [tf.TensorSpec([None, 4, 4, 1]), tf.TensorSpec([None, 3, 3, 2])]
    sample = tf.function(bilinear_sample, input_signature=spec)
    images, grid = tf.ones([images_batch, 4, 4, 1]), tf.zeros([grid_batch, 3, 3, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="images and grid must have the same"):
        sample(images, grid)


def test_unknown_rank_and_last_dimension_are_checked_at_run_time():
    spec = [tf.TensorSpec(None), tf.TensorSpec([None, None, None, None])]
    sample = tf.function(bilinear_sample, input_signature=spec)
    rng = np.random.default_rng(9)
    images = tf.constant(rng.normal(size=(2, 5, 4, 3)), tf.float32)
    grid = tf.constant(rng.uniform(-1.2, 1.2, (2, 3, 6, 2)), tf.float32)
    expected = reference_sample(images, grid, "zeros", False)
    np.testing.assert_allclose(sample(images, grid), expected, atol=1e-5)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"(grid must have shape|\[\?,\?,\?,2\])"
    ):
        sample(images, tf.zeros([2, 3, 6, 3]))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"(images must have shape|\[\?,\?,\?,\?\])"
    ):
        sample(tf.zeros([2, 5, 4]), grid)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("shape", [(1, 0, 4, 1), (1, 3, 0, 1)])
def test_an_empty_height_or_width_known_only_at_run_time_raises(shape, padding_mode):
    spec = [tf.TensorSpec([None] * 4), tf.TensorSpec([None, None, None, 2])]
    sample = tf.function(lambda i, g: bilinear_sample(i, g, padding_mode), input_signature=spec)
    with pytest.raises(tf.errors.InvalidArgumentError, match="positive height and width"):
        sample(tf.ones(shape), tf.zeros([1, 2, 2, 2]))


@pytest.mark.parametrize(("padding_mode", "align_corners"), MODES)
def test_inf_coordinates_lie_outside_and_nan_coordinates_sample_nan(padding_mode, align_corners):
    rng = np.random.default_rng(10)
    images = tf.constant(rng.normal(size=(2, 5, 4, 3)), tf.float32)
    weights = tf.constant(rng.normal(size=(2, 3, 4, 3)), tf.float32)
    grid = rng.uniform(-1.2, 1.2, (2, 3, 4, 2))
    grid[0, 0, :3] = [[np.inf, 0.3], [-0.2, -np.inf], [-np.inf, np.inf]]
    grid[0, 1, 2], grid[1, 0, 0], grid[1, 2, 3] = [np.nan, 0.1], [0.5, np.nan], [np.nan, np.inf]
    nan = np.isnan(grid).any(axis=-1)
    # The oracle: +-inf as a point far outside (1e6), NaN points far outside with zero weight.
    far = np.clip(np.nan_to_num(grid, nan=1e6), -1e6, 1e6)
    expected = reference_sample(images, far, padding_mode, align_corners)
    expected[nan] = np.nan
    _, images_grad, grid_grad = sample_and_gradients(
        images, tf.constant(far, tf.float32), weights * ~nan[..., None], padding_mode, align_corners
    )
    grid_grad = grid_grad.numpy()
    grid_grad[nan] = np.nan
    args = (images, tf.constant(grid, tf.float32), weights, padding_mode, align_corners)
    for sample in (sample_and_gradients, tf.function(sample_and_gradients, jit_compile=True)):
        out, images_grad_at_grid, grid_grad_at_grid = sample(*args)
        np.testing.assert_allclose(out, expected, atol=1e-5)
        np.testing.assert_allclose(images_grad_at_grid, images_grad, atol=1e-5)
        np.testing.assert_allclose(grid_grad_at_grid, grid_grad, atol=1e-5)
        assert not np.any(grid_grad_at_grid.numpy()[np.isinf(grid) & ~nan[..., None]])


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", [(2, 1, 3, 2), (2, 3, 1, 2)])
def test_inf_coordinates_read_the_edge_of_a_one_pixel_axis_under_border(shape, align_corners):
    # With align_corners, a one-pixel axis scales coordinates by 0, and inf * 0 is NaN.
    rng = np.random.default_rng(16)
    images = tf.constant(rng.normal(size=shape), tf.float32)
    weights = tf.constant(rng.normal(size=(2, 1, 4, 2)), tf.float32)
    grid = np.array([[[np.inf, 0.2], [-np.inf, -0.5], [0.4, np.inf], [-0.3, -np.inf]]] * 2)
    far = tf.constant(np.clip(grid, -1e6, 1e6)[:, None], tf.float32)
    args = (images, tf.constant(grid[:, None], tf.float32), weights, "border", align_corners)
    expected = sample_and_gradients(images, far, weights, "border", align_corners)
    reference = reference_sample(images, far, "border", align_corners)
    np.testing.assert_allclose(expected[0], reference, atol=1e-6)
    for sample in (sample_and_gradients, tf.function(sample_and_gradients, jit_compile=True)):
        for got, want in zip(sample(*args), expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(tf.float16, 2e-2), (tf.bfloat16, 1e-1), (tf.float32, 1e-5), (tf.float64, 1e-12)],
)
def test_dtypes_are_preserved(dtype, tolerance):
    rng = np.random.default_rng(6)
    images = rng.uniform(-1, 1, size=(2, 8, 6, 3))
    grid = affine_grid(random_affine(rng, 2), (5, 4)).numpy()
    weights = tf.ones([2, 5, 4, 3])
    out, images_grad, grid_grad = sample_and_gradients(
        tf.constant(images, dtype), tf.constant(grid, dtype), weights, "zeros", False
    )
    assert out.dtype == images_grad.dtype == grid_grad.dtype == dtype
    expected = reference_sample(
        tf.cast(tf.constant(images, dtype), tf.float64),
        tf.cast(tf.constant(grid, dtype), tf.float64),
        "zeros",
        False,
    )
    np.testing.assert_allclose(tf.cast(out, tf.float64), expected, atol=tolerance)


def test_float32_grid_with_float16_images():
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, size=(1, 30, 30, 1))
    grid = rng.uniform(-1, 1, size=(1, 6, 6, 2))
    out = bilinear_sample(tf.constant(images, tf.float16), tf.constant(grid, tf.float32))
    assert out.dtype == tf.float16
    expected = reference_sample(
        tf.cast(tf.constant(images, tf.float16), tf.float64), grid, "zeros", False
    )
    np.testing.assert_allclose(tf.cast(out, tf.float64), expected, atol=2e-3)


@pytest.mark.parametrize(
    ("images", "grid", "kwargs", "message"),
    [
        ((2, 4, 4, 1), (2, 3, 3, 2), {"padding_mode": "reflection"}, "padding_mode must be one of"),
        ((4, 4, 1), (2, 3, 3, 2), {}, r"images must have shape \[B, H, W, C\], got \(4, 4, 1\)"),
        (
            (2, 4, 4, 1),
            (2, 3, 3, 3),
            {},
            r"grid must have shape \[B, H', W', 2\], got \(2, 3, 3, 3\)",
        ),
        ((2, 4, 4, 1), (2, 9, 2), {}, r"grid must have shape .*got \(2, 9, 2\)"),
        ((2, 4, 4, 1), (3, 3, 3, 2), {}, r"same batch size, got \(2, 4, 4, 1\) and \(3, 3, 3, 2\)"),
        ((2, 0, 4, 1), (2, 3, 3, 2), {}, r"positive height and width, got \(2, 0, 4, 1\)"),
        ((2, 4, 4, 1), (2, 3, 3, 2), {"align_corners": "no"}, "align_corners must be True or"),
    ],
)
def test_bad_arguments_raise(images, grid, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bilinear_sample(tf.zeros(images), tf.zeros(grid), **kwargs)


def test_integer_images_raise():
    with pytest.raises(ValueError, match="images must have a floating dtype, got int32"):
        bilinear_sample(tf.zeros([1, 2, 2, 1], tf.int32), tf.zeros([1, 2, 2, 2]))


def test_tap_indices_of_a_batch_past_2_to_the_31_padded_pixels_do_not_overflow():
    # In int32 these indices wrapped: under XLA, which clamps them, the pure-TF path read 0 at
    # the last pixel of a 46,341 x 46,341 image (9 GB to run); so would a batch of big images.
    size, padded = 40_000, 40_002
    x0, _, _ = _floor_and_fraction(tf.fill([2, 1, 1], size - 1.0), size)
    top_left = _top_left(tf.constant([2, size, size, 1], tf.int64), x0, x0)
    assert top_left.numpy()[1, 0, 0] == padded * padded + size * padded + size
