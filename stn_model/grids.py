"""Grid generators: map each output pixel to normalized (x, y) sampling coordinates.

Coordinates follow PyTorch's `F.affine_grid`: x runs left to right and y top to bottom over
[-1, 1]; with align_corners=False, -1 and 1 are the outer edges of the corner pixels, with
align_corners=True they are the centers of the corner pixels. Grids are NHWC: [B, H, W, 2], in
the dtype of the transform parameters (integers become float32).
"""

import functools

import numpy as np
import tensorflow as tf

from stn_model.checks import check_bool, check_size


def _steps(n, align_corners):
    """The n normalized pixel coordinates along one axis (PyTorch's linspace_from_neg_one)."""
    if check_bool(align_corners, "align_corners"):
        return np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    return (np.arange(n) * 2.0 + 1.0) / n - 1.0


@functools.lru_cache(maxsize=64)
def _base_grid(height, width, align_corners):
    """Homogeneous output coordinates [H*W, 3] = (x, y, 1), row-major, as float64 NumPy."""
    x, y = np.meshgrid(_steps(width, align_corners), _steps(height, align_corners))
    grid = np.stack([x.ravel(), y.ravel(), np.ones(height * width)], axis=-1)
    grid.setflags(write=False)
    return grid


def _parameters(theta, name, shapes):
    """theta as a floating tensor, checked against the allowed static shapes (None = any)."""
    theta = tf.convert_to_tensor(theta)
    if not theta.dtype.is_floating:
        theta = tf.cast(theta, tf.float32)
    dims = theta.shape.as_list() if theta.shape.rank is not None else None
    if dims is None or not any(dims[1:] == list(shape) for shape in shapes):
        allowed = " or ".join(str(["B", *shape]).replace("'", "") for shape in shapes)
        raise ValueError(f"{name} must have shape {allowed}, got {theta.shape}")
    return theta


def _apply_matrices(matrices, output_size, align_corners):
    """matrices [B, R, 3] applied to every homogeneous output coordinate: -> [B, H, W, R]."""
    height, width = check_size(output_size)
    base = tf.constant(_base_grid(height, width, align_corners), dtype=matrices.dtype)
    points = tf.einsum("pk,bjk->bpj", base, matrices)
    return tf.reshape(points, [-1, height, width, matrices.shape[1]])


def affine_grid(theta, output_size, align_corners=False):
    """Sampling grid [B, H, W, 2] for affine matrices theta [B, 2, 3] (or [B, 6]).

    Same meaning as PyTorch's `F.affine_grid(theta, (B, C, H, W), align_corners)`.
    """
    theta = _parameters(theta, "theta", [(2, 3), (6,)])
    return _apply_matrices(tf.reshape(theta, [-1, 2, 3]), output_size, align_corners)


def projective_grid(theta, output_size, align_corners=False):
    """Sampling grid for homographies theta [B, 3, 3] (or [B, 8]; the ninth entry is 1).

    The output pixel (x, y) samples the input at (u / w, v / w) with (u, v, w) = theta (x, y, 1).
    Where w is 0 the point is at infinity (+-inf by the sign of u and v; +inf where they are 0
    too), outside the image, and passes no gradient to theta.
    """
    theta = _parameters(theta, "theta", [(3, 3), (8,)])
    if theta.shape.rank == 2:
        theta = tf.concat([theta, tf.ones_like(theta[:, :1])], axis=-1)
    uvw = _apply_matrices(tf.reshape(theta, [-1, 3, 3]), output_size, align_corners)
    uv, w = uvw[..., :2], uvw[..., 2:]
    at_infinity = tf.broadcast_to(tf.equal(w, 0.0), tf.shape(uv))
    infinity = tf.fill(tf.shape(uv), tf.constant(float("inf"), uv.dtype))
    # Both branches of a tf.where get gradients: the divisor of the other one must not be 0.
    finite = uv / tf.where(tf.equal(w, 0.0), tf.ones_like(w), w)
    return tf.where(at_infinity, tf.where(uv < 0, -infinity, infinity), finite)


def similarity_matrices(theta):
    """Similarity parameters [B, 4] = (a, b, tx, ty) -> affine matrices [B, 2, 3].

    The matrix is [[a, -b, tx], [b, a, ty]]: with a = s cos(r) and b = s sin(r), a turn by r
    and a uniform scaling by s, then a shift by (tx, ty).
    """
    a, b, tx, ty = tf.unstack(theta, axis=-1)
    return tf.reshape(tf.stack([a, -b, tx, b, a, ty], axis=-1), [-1, 2, 3])


def similarity_grid(theta, output_size, align_corners=False):
    """Sampling grid for similarity transforms theta [B, 4] = (a, b, tx, ty).

    The output pixel (x, y) samples the input at (a x - b y + tx, b x + a y + ty): rotation,
    uniform scale and translation only, the distortions of RTS (see `similarity_matrices`).
    """
    theta = _parameters(theta, "theta", [(4,)])
    return _apply_matrices(similarity_matrices(theta), output_size, align_corners)


def tps_control_points(grid_size, dtype=np.float64):
    """The K x K regular control points [K*K, 2] over [-1, 1] (x varies fastest)."""
    steps = np.linspace(-1.0, 1.0, grid_size)
    x, y = np.meshgrid(steps, steps)
    return np.stack([x.ravel(), y.ravel()], axis=-1).astype(dtype)


def _tps_kernel(squared_distance):
    # U(r) = r^2 log r^2, with U(0) = 0.
    return squared_distance * np.log(np.where(squared_distance > 0, squared_distance, 1.0))


@functools.lru_cache(maxsize=64)
def _tps_mixing(grid_size, height, width, align_corners):
    """[H*W, K*K] float64: every output point of a TPS is this fixed mix of the K*K targets.

    With the source points fixed (the K x K regular grid), solving L [w; a] = [targets; 0] is a
    constant linear map of the targets, and so is evaluating the spline at the output points.
    """
    source = tps_control_points(grid_size)
    n = len(source)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = _tps_kernel(np.sum((source[:, None] - source[None]) ** 2, axis=-1))
    system[:n, n] = 1.0
    system[:n, n + 1 :] = source
    system[n, :n] = 1.0
    system[n + 1 :, :n] = source.T
    coefficients = np.linalg.solve(system, np.eye(n + 3)[:, :n])  # [n + 3, n]
    base = _base_grid(height, width, align_corners)
    distances = np.sum((base[:, None, :2] - source[None]) ** 2, axis=-1)
    features = np.concatenate([_tps_kernel(distances), base[:, 2:], base[:, :2]], axis=-1)
    mixing = features @ coefficients
    mixing.setflags(write=False)
    return mixing


def tps_grid(control_points, output_size, align_corners=False):
    """Thin-plate-spline sampling grid [B, H, W, 2].

    control_points: [B, K*K, 2] or [B, 2*K*K] (K >= 2): target (x, y) in normalized input
    coordinates of each of the regular K x K source points of `tps_control_points(K)`, in the
    same order. The spline maps each source point onto its target; targets equal to the source
    points give the identity transform.
    """
    points = tf.convert_to_tensor(control_points)
    if not points.dtype.is_floating:
        points = tf.cast(points, tf.float32)
    shape = points.shape
    count = None
    if shape.rank == 3 and shape[2] == 2:
        count = shape[1]
    elif shape.rank == 2 and shape[1] is not None and shape[1] % 2 == 0:
        count = shape[1] // 2
    grid_size = round(count**0.5) if count else 0
    if grid_size < 2 or grid_size * grid_size != count:
        raise ValueError(
            f"control_points must have shape [B, K*K, 2] or [B, 2*K*K] with K >= 2, got {shape}"
        )
    height, width = check_size(output_size)
    mixing = _tps_mixing(grid_size, height, width, align_corners)
    grid = tf.einsum(
        "pn,bnj->bpj", tf.constant(mixing, points.dtype), tf.reshape(points, [-1, count, 2])
    )
    return tf.reshape(grid, [-1, height, width, 2])
