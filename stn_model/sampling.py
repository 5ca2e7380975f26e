"""Bilinear sampling of NHWC images at normalized grid coordinates (PyTorch's grid_sample)."""

import tensorflow as tf

PADDING_MODES = ("zeros", "border")


def _unnormalize(coord, size, align_corners):
    size = tf.cast(size, coord.dtype)
    if align_corners:
        return (coord + 1.0) * 0.5 * (size - 1.0)
    return ((coord + 1.0) * size - 1.0) * 0.5


def bilinear_sample(images, grid, padding_mode="zeros", align_corners=False):
    """Samples images [B, H, W, C] at grid [B, H', W', 2] of normalized (x, y); -> [B, H', W', C].

    Taps outside the image read zero ("zeros") or the coordinates are clamped to the image
    ("border"). The bilinear weights come from the unclipped coordinates, so gradients with
    respect to the grid are exact at the borders too.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    images = tf.convert_to_tensor(images)
    grid = tf.convert_to_tensor(grid, dtype=images.dtype)
    if images.shape.rank != 4:
        raise ValueError(f"images must have rank 4 [B, H, W, C], got {images.shape.as_list()}")
    if grid.shape.rank != 4 or grid.shape[-1] != 2:
        raise ValueError(f"grid must have shape [B, H', W', 2], got {grid.shape.as_list()}")
    shape = tf.shape(images)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    x = _unnormalize(grid[..., 0], width, align_corners)
    y = _unnormalize(grid[..., 1], height, align_corners)
    if padding_mode == "border":
        x = tf.clip_by_value(x, 0.0, tf.cast(width - 1, x.dtype))
        y = tf.clip_by_value(y, 0.0, tf.cast(height - 1, y.dtype))
    x0 = tf.floor(x)
    y0 = tf.floor(y)
    wx1 = x - x0
    wy1 = y - y0
    wx0 = 1.0 - wx1
    wy0 = 1.0 - wy1
    x0 = tf.cast(x0, tf.int32)
    y0 = tf.cast(y0, tf.int32)
    flat = tf.reshape(images, [-1, channels])
    base = tf.reshape(tf.range(batch) * height * width, [-1, 1, 1])
    out = 0.0
    for dx, dy, weight in (
        (0, 0, wx0 * wy0),
        (1, 0, wx1 * wy0),
        (0, 1, wx0 * wy1),
        (1, 1, wx1 * wy1),
    ):
        xi = x0 + dx
        yi = y0 + dy
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        index = (
            base + tf.clip_by_value(yi, 0, height - 1) * width + tf.clip_by_value(xi, 0, width - 1)
        )
        weight = tf.where(inside, weight, tf.zeros_like(weight))
        out += tf.gather(flat, index) * weight[..., None]
    return out
