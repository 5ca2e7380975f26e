"""Grid generators against hand-computed values, NumPy formulas and SciPy's thin-plate spline."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.interpolate import RBFInterpolator

from stn_model import affine_grid, projective_grid, similarity_grid, tps_grid
from stn_model.grids import tps_control_points

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def normalized_steps(n, align_corners):
    """PyTorch's documented convention, written out: pixel centers, or the corners at +-1."""
    if align_corners:
        return np.array([0.0]) if n == 1 else -1.0 + 2.0 * np.arange(n) / (n - 1)
    return -1.0 + (2.0 * np.arange(n) + 1.0) / n


def homogeneous_output_points(height, width, align_corners):
    """[H, W, 3] = (x, y, 1) of every output pixel."""
    x, y = np.meshgrid(
        normalized_steps(width, align_corners), normalized_steps(height, align_corners)
    )
    return np.stack([x, y, np.ones_like(x)], axis=-1)


def test_identity_affine_grid_by_hand():
    grid = affine_grid(IDENTITY[None], (2, 3)).numpy()[0]
    np.testing.assert_allclose(grid[..., 0], [[-2 / 3, 0, 2 / 3]] * 2, atol=1e-15)
    np.testing.assert_allclose(grid[..., 1], [[-0.5] * 3, [0.5] * 3], atol=1e-15)
    grid = affine_grid(IDENTITY[None], (2, 3), align_corners=True).numpy()[0]
    np.testing.assert_allclose(grid[..., 0], [[-1, 0, 1]] * 2, atol=1e-15)
    np.testing.assert_allclose(grid[..., 1], [[-1] * 3, [1] * 3], atol=1e-15)
    np.testing.assert_array_equal(affine_grid(IDENTITY[None], (1, 1), True).numpy(), 0.0)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [(3, 5), (4, 4), (1, 6)])
def test_affine_grid_matches_the_matrix_product(size, align_corners):
    theta = np.random.default_rng(0).normal(size=(3, 2, 3))
    expected = np.einsum("hwk,bjk->bhwj", homogeneous_output_points(*size, align_corners), theta)
    grid = affine_grid(theta, size, align_corners)
    assert grid.shape == (3, *size, 2)
    np.testing.assert_allclose(grid.numpy(), expected, atol=1e-14)
    flat = affine_grid(theta.reshape(3, 6), size, align_corners)
    np.testing.assert_array_equal(flat.numpy(), grid.numpy())


@pytest.mark.parametrize("align_corners", [False, True])
def test_projective_grid_divides_by_the_third_coordinate(align_corners):
    rng = np.random.default_rng(1)
    theta = np.eye(3) + rng.normal(scale=0.1, size=(2, 3, 3))
    theta[:, 2, 2] = 1.0
    uvw = np.einsum("hwk,bjk->bhwj", homogeneous_output_points(4, 6, align_corners), theta)
    expected = uvw[..., :2] / uvw[..., 2:]
    np.testing.assert_allclose(projective_grid(theta, (4, 6), align_corners), expected, atol=1e-14)
    eight = theta.reshape(2, 9)[:, :8]
    np.testing.assert_allclose(projective_grid(eight, (4, 6), align_corners), expected, atol=1e-14)


def projective_sample_loss(theta):
    from stn_model import bilinear_sample

    images = tf.constant(np.random.default_rng(0).random((1, 4, 4, 1)))
    return tf.reduce_sum(bilinear_sample(images, projective_grid(theta, (4, 4))))


def loss_and_gradient(theta):
    theta = tf.constant(theta)
    with tf.GradientTape() as tape:
        tape.watch(theta)
        value = projective_sample_loss(theta)
    return value.numpy(), tape.gradient(value, theta).numpy()


def test_projective_points_at_0_over_0_lie_outside_the_image_too():
    # u = x + 0.25 and w = 4x + 1 are both 0 at x = -0.25: 0 / 0 must not sample NaN.
    theta = np.array([[1.0, 0, 0.25, 0, 1, 0, 4, 0]])
    assert np.isinf(projective_grid(theta, (4, 4)).numpy()).sum() == 8
    value, gradient = loss_and_gradient(theta)
    assert np.isfinite(value) and np.isfinite(gradient).all()


def test_projective_points_at_infinity_pass_no_nan_gradient():
    # w = 4x + 1 is 0 at x = -0.25, one column of a 4 x 4 grid: those points lie outside the
    # image, so the loss near theta is smooth and central differences give its gradient.
    theta = np.array([[1.0, 0, 0, 0, 1, 0, 4, 0]])
    assert np.isinf(projective_grid(theta, (4, 4)).numpy()).sum() == 8
    _, gradient = loss_and_gradient(theta)
    eps = 1e-7
    steps = np.eye(8)[:, None, :] * eps
    loss = projective_sample_loss
    expected = [(loss(theta + step) - loss(theta - step)) / (2 * eps) for step in steps]
    np.testing.assert_allclose(gradient[0], expected, atol=1e-6)


@pytest.mark.parametrize("align_corners", [False, True])
def test_similarity_grid_turns_scales_and_shifts(align_corners):
    # (a, b) = s (cos r, sin r): each output point p samples s R(r) p + t.
    turn, scale, shift = np.radians([90.0, -30.0]), np.array([2.0, 0.6]), [[0.5, -0.25], [0, 0.1]]
    theta = np.stack([scale * np.cos(turn), scale * np.sin(turn), *np.transpose(shift)], axis=1)
    points = homogeneous_output_points(3, 5, align_corners)[..., :2]
    for b in range(2):
        c, s = np.cos(turn[b]), np.sin(turn[b])
        expected = scale[b] * points @ np.array([[c, -s], [s, c]]).T + shift[b]
        grid = similarity_grid(theta[b : b + 1], (3, 5), align_corners).numpy()[0]
        np.testing.assert_allclose(grid, expected, atol=1e-14)
    # by hand: a quarter turn doubled maps the output's right edge centre (1, 0) to (0.5, 1.75)
    right_edge = similarity_grid(theta[:1], (1, 3), align_corners=True).numpy()[0, 0, 2]
    np.testing.assert_allclose(right_edge, [0.5, 1.75], atol=1e-14)


def test_projective_grid_with_an_affine_matrix_is_the_affine_grid():
    theta = np.random.default_rng(2).normal(size=(2, 2, 3))
    matrix = np.concatenate([theta, np.tile([[[0.0, 0.0, 1.0]]], (2, 1, 1))], axis=1)
    np.testing.assert_allclose(
        projective_grid(matrix, (5, 3)), affine_grid(theta, (5, 3)), atol=1e-14
    )


@pytest.mark.parametrize("grid_size", [2, 4])
@pytest.mark.parametrize("align_corners", [False, True])
def test_tps_with_the_source_points_is_the_identity(grid_size, align_corners):
    points = tps_control_points(grid_size)[None]
    expected = affine_grid(IDENTITY[None], (5, 7), align_corners)
    np.testing.assert_allclose(tps_grid(points, (5, 7), align_corners), expected, atol=1e-12)


def test_tps_reproduces_an_affine_map():
    theta = np.array([[[0.8, -0.3, 0.1], [0.25, 1.1, -0.2]]])
    source = tps_control_points(4)
    targets = np.concatenate([source, np.ones((16, 1))], axis=1) @ theta[0].T
    grid = tps_grid(targets.reshape(1, 32), (6, 5))
    np.testing.assert_allclose(grid, affine_grid(theta, (6, 5)), atol=1e-12)


def test_tps_passes_through_the_control_points():
    # With align_corners=True and 3 * 3 + 1 = 10 output pixels per axis, every third output
    # pixel lies exactly on a control point of the 4 x 4 grid.
    targets = tps_control_points(4) + np.random.default_rng(3).normal(scale=0.1, size=(16, 2))
    grid = tps_grid(targets[None], (10, 10), align_corners=True).numpy()[0]
    np.testing.assert_allclose(grid[::3, ::3].reshape(16, 2), targets, atol=1e-12)


def test_tps_matches_scipy_thin_plate_spline():
    targets = tps_control_points(3) + np.random.default_rng(4).normal(scale=0.2, size=(9, 2))
    spline = RBFInterpolator(tps_control_points(3), targets, kernel="thin_plate_spline", degree=1)
    points = homogeneous_output_points(7, 4, False)[..., :2].reshape(-1, 2)
    grid = tps_grid(targets[None], (7, 4)).numpy()
    np.testing.assert_allclose(grid.reshape(-1, 2), spline(points), atol=1e-10)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
def test_grids_keep_the_parameter_dtype(dtype):
    theta = tf.constant(IDENTITY[None], dtype)
    homography = tf.constant(np.eye(3)[None], dtype)
    points = tf.constant(tps_control_points(3)[None], dtype)
    expected = homogeneous_output_points(3, 4, False)[None, ..., :2]
    tolerance = 1e-2 if dtype.size == 2 else 1e-6
    for grid in (
        affine_grid(theta, (3, 4)),
        projective_grid(homography, (3, 4)),
        tps_grid(points, (3, 4)),
    ):
        assert grid.dtype == dtype
        np.testing.assert_allclose(tf.cast(grid, tf.float64), expected, atol=tolerance)


def test_integer_parameters_give_float32():
    assert affine_grid([[1, 0, 0, 0, 1, 0]], (2, 2)).dtype == tf.float32


def test_grids_with_an_unknown_batch_size_in_tf_function():
    spec = tf.TensorSpec([None, 16, 2], tf.float64)
    tps = tf.function(lambda points: tps_grid(points, (5, 6)), input_signature=[spec])
    affine = tf.function(lambda theta: affine_grid(theta, (5, 6)), input_signature=[spec])
    points = np.tile(tps_control_points(4), (3, 1, 1))
    expected = affine_grid(np.tile(IDENTITY, (3, 1, 1)), (5, 6))
    np.testing.assert_allclose(tps(points), expected, atol=1e-12)
    with pytest.raises(ValueError, match=r"theta must have shape \[B, 2, 3\] or \[B, 6\]"):
        affine.get_concrete_function()


@pytest.mark.parametrize(
    ("generator", "parameters", "message"),
    [
        (affine_grid, np.zeros((2, 3, 3)), r"theta must have shape .*got \(2, 3, 3\)"),
        (affine_grid, np.zeros((2, 7)), r"theta must have shape .*got \(2, 7\)"),
        (affine_grid, np.zeros(6), r"theta must have shape .*got \(6,\)"),
        (projective_grid, np.zeros((2, 2, 3)), r"\[B, 3, 3\] or \[B, 8\], got \(2, 2, 3\)"),
        (projective_grid, np.zeros((2, 9)), r"theta must have shape .*got \(2, 9\)"),
        (similarity_grid, np.zeros((2, 6)), r"theta must have shape \[B, 4\], got \(2, 6\)"),
        (tps_grid, np.zeros((2, 15)), r"control_points must have shape .*got \(2, 15\)"),
        (tps_grid, np.zeros((2, 1, 2)), r"K >= 2, got \(2, 1, 2\)"),
        (tps_grid, np.zeros((2, 9, 3)), r"control_points must have shape .*got \(2, 9, 3\)"),
    ],
)
def test_wrong_parameter_shapes_raise(generator, parameters, message):
    with pytest.raises(ValueError, match=message):
        generator(parameters, (4, 4))


def test_align_corners_must_be_a_bool():
    with pytest.raises(ValueError, match="align_corners must be True or False, got 'False'"):
        affine_grid(IDENTITY[None], (4, 4), align_corners="False")


@pytest.mark.parametrize("output_size", [(0, 4), (4, -1), (4,), "ab", None])
def test_bad_output_sizes_raise(output_size):
    with pytest.raises(ValueError, match="output_size must be"):
        affine_grid(IDENTITY[None], output_size)
    with pytest.raises(ValueError, match="output_size must be"):
        tps_grid(tps_control_points(2)[None], output_size)
