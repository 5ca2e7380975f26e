"""Grid generators: map each output pixel to normalized (x, y) sampling coordinates.

Coordinates follow PyTorch's `F.affine_grid`: x runs left to right and y top to bottom over
[-1, 1]; with align_corners=False, -1 and 1 are the outer edges of the corner pixels, with
align_corners=True they are the centers of the corner pixels. Grids are NHWC: [B, H, W, 2].
"""

import numpy as np
import tensorflow as tf


def _output_size(output_size):
    try:
        height, width = (int(v) for v in output_size)
    except (TypeError, ValueError):
        raise ValueError(f"output_size must be (height, width), got {output_size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return height, width


def _linspace(n, align_corners, dtype):
    if align_corners:
        steps = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    else:
        steps = (np.arange(n) * 2.0 + 1.0) / n - 1.0
    return tf.constant(steps, dtype=dtype)


def base_grid(output_size, align_corners=False, dtype=tf.float32):
    """Homogeneous output coordinates [H, W, 3] = (x, y, 1) of every output pixel."""
    height, width = _output_size(output_size)
    xs = _linspace(width, align_corners, dtype)
    ys = _linspace(height, align_corners, dtype)
    x, y = tf.meshgrid(xs, ys)
    return tf.stack([x, y, tf.ones_like(x)], axis=-1)


def _matrices(theta, name, rows, flat_size):
    theta = tf.convert_to_tensor(theta)
    if not theta.dtype.is_floating:
        theta = tf.cast(theta, tf.float32)
    shape = theta.shape
    if shape.rank == 2 and shape[-1] == flat_size:
        return theta
    if shape.rank == 3 and shape[1] == rows and shape[2] == 3:
        return theta
    raise ValueError(
        f"{name} must have shape [B, {rows}, 3] or [B, {flat_size}], got {shape.as_list()}"
    )


def affine_grid(theta, output_size, align_corners=False):
    """Sampling grid [B, H, W, 2] for affine matrices theta [B, 2, 3] (or [B, 6])."""
    theta = _matrices(theta, "theta", 2, 6)
    theta = tf.reshape(theta, [-1, 2, 3])
    grid = base_grid(output_size, align_corners, theta.dtype)
    return tf.einsum("hwk,bjk->bhwj", grid, theta)


def projective_grid(theta, output_size, align_corners=False):
    """Sampling grid for homographies theta [B, 3, 3] (or [B, 8]; the ninth entry is 1)."""
    theta = tf.convert_to_tensor(theta)
    if not theta.dtype.is_floating:
        theta = tf.cast(theta, tf.float32)
    if theta.shape.rank == 2 and theta.shape[-1] == 8:
        theta = tf.concat([theta, tf.ones_like(theta[:, :1])], axis=-1)
    elif not (theta.shape.rank == 3 and theta.shape[1] == 3 and theta.shape[2] == 3):
        raise ValueError(f"theta must have shape [B, 3, 3] or [B, 8], got {theta.shape.as_list()}")
    theta = tf.reshape(theta, [-1, 3, 3])
    grid = base_grid(output_size, align_corners, theta.dtype)
    xyw = tf.einsum("hwk,bjk->bhwj", grid, theta)
    return xyw[..., :2] / xyw[..., 2:]


def tps_control_points(grid_size, dtype=np.float64):
    """The K x K regular control points [K*K, 2] over [-1, 1] (x varies fastest)."""
    steps = np.linspace(-1.0, 1.0, grid_size)
    x, y = np.meshgrid(steps, steps)
    return np.stack([x.ravel(), y.ravel()], axis=-1).astype(dtype)


def _tps_kernel(squared_distance):
    # U(r) = r^2 log r^2, with U(0) = 0.
    return squared_distance * np.log(np.where(squared_distance > 0, squared_distance, 1.0))


def tps_grid(control_points, output_size, align_corners=False):
    """Thin-plate-spline sampling grid.

    control_points: [B, K*K, 2] or [B, 2*K*K], where each target (x, y) in input coordinates
    belongs to the regular K x K source point of `tps_control_points(K)` with the same index.
    Targets equal to the source points give the identity transform.
    """
    points = tf.convert_to_tensor(control_points)
    if not points.dtype.is_floating:
        points = tf.cast(points, tf.float32)
    shape = points.shape
    count = shape[1] if shape.rank == 3 else (shape[-1] // 2 if shape.rank == 2 else None)
    k = round(count**0.5) if count else 0
    valid = (shape.rank == 3 and shape[-1] == 2) or (shape.rank == 2 and shape[-1] % 2 == 0)
    if not valid or k < 2 or k * k != count:
        raise ValueError(
            "control_points must have shape [B, K*K, 2] or [B, 2*K*K] with K >= 2, "
            f"got {shape.as_list()}"
        )
    points = tf.reshape(points, [-1, count, 2])
    source = tps_control_points(k)
    n = count
    # Solve L [W; A] = [targets; 0] once for the fixed source points: L^-1 is a constant.
    d2 = np.sum((source[:, None, :] - source[None, :, :]) ** 2, axis=-1)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = _tps_kernel(d2)
    system[:n, n] = 1.0
    system[:n, n + 1 :] = source
    system[n, :n] = 1.0
    system[n + 1 :, :n] = source.T
    inverse = np.linalg.inv(system)[:, :n]  # [n+3, n]: coefficients per unit of target.
    height, width = _output_size(output_size)
    base = base_grid((height, width), align_corners, tf.float64).numpy().reshape(-1, 3)
    pd2 = np.sum((base[:, None, :2] - source[None, :, :]) ** 2, axis=-1)
    features = np.concatenate([_tps_kernel(pd2), base[:, 2:], base[:, :2]], axis=-1)
    # Every output point is a fixed linear combination of the targets: grid = M @ targets.
    mixing = tf.constant(features @ inverse, dtype=points.dtype)  # [H*W, n]
    grid = tf.einsum("pn,bnj->bpj", mixing, points)
    return tf.reshape(grid, [-1, height, width, 2])
