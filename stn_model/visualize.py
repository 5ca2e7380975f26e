"""Pictures of what a spatial transformer does, and of training: matplotlib figures as PNG files.

- `plot_rectification`: input images above what the transformer made of them.
- `plot_sampling_grids`: the learned sampling grid (its outline and a few grid lines) drawn
  over each input image.
- `plot_training_curves`: per-epoch metrics of one or more training runs.
- `plot_slice_metrics`: a bar chart of metrics per data slice.

Grids hold normalized (x, y) input coordinates in [-1, 1] with the convention of
`stn_model.affine_grid` (PyTorch's `F.affine_grid`); `normalized_to_pixels` converts them to
the pixel coordinates that `imshow` uses (pixel centres at 0, 1, ..., edges at -0.5 and
size - 0.5). Only NumPy and matplotlib (Agg backend) are used here, no TensorFlow: pass arrays.
"""

import math
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # after matplotlib.use: the backend is chosen first
from matplotlib import ticker

_DPI = 100
_CELL_INCHES = 1.1  # side of one image panel
_GRID_LINES = 5  # grid lines drawn per direction, outline included


def normalized_to_pixels(points, height, width, align_corners=False):
    """Normalized (x, y) coordinates [..., 2] -> pixel (x, y) coordinates of an H x W image.

    With align_corners=False, -1 and 1 are the outer edges of the corner pixels (pixel
    -0.5 and size - 0.5); with align_corners=True they are the corner pixels' centres (0 and
    size - 1). Same meaning as in `stn_model.affine_grid` and `bilinear_sample`.
    """
    points = np.asarray(points, dtype=float)
    if points.ndim < 1 or points.shape[-1] != 2:
        raise ValueError(f"points must have shape [..., 2], got {points.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    size = np.array([width, height], dtype=float)
    if align_corners:
        return (points + 1.0) / 2.0 * (size - 1.0)
    return ((points + 1.0) * size - 1.0) / 2.0


def grid_outline(grid):
    """Closed polygon [2 * (H + W) + 1, 2] around a sampling grid [H, W, 2] (normalized).

    The grid holds the sampling points of the output pixels' centres; the outline goes half a
    pixel further, to the output image's outer edges, by linear extrapolation from the two
    outermost rows and columns (exact for affine grids). So the identity grid's outline runs
    along the input image's border (align_corners=False).
    """
    grid = np.asarray(grid, dtype=float)
    if grid.ndim != 3 or grid.shape[2] != 2 or min(grid.shape[:2]) < 2:
        raise ValueError(f"grid must have shape [H, W, 2] with H, W >= 2, got {grid.shape}")
    # Pad by one extrapolated row/column on each side, then move half-way towards it.
    rows = np.concatenate([2 * grid[:1] - grid[1:2], grid, 2 * grid[-1:] - grid[-2:-1]], axis=0)
    padded = np.concatenate(
        [2 * rows[:, :1] - rows[:, 1:2], rows, 2 * rows[:, -1:] - rows[:, -2:-1]], axis=1
    )
    edges = (padded[1:, 1:] + padded[:-1, :-1] + padded[1:, :-1] + padded[:-1, 1:]) / 4.0
    # edges[i, j] is the corner shared by output pixels (i - 1, j - 1) .. (i, j).
    top, right = edges[0, :-1], edges[:-1, -1]
    bottom, left = edges[-1, :0:-1], edges[:0:-1, 0]
    return np.concatenate([top, right, bottom, left, edges[:1, 0]], axis=0)


def plot_rectification(inputs, rectified, path, labels=None, title=None):
    """Save a PNG: each input image (top row) above its rectified image (bottom row).

    inputs: [N, H, W] or [N, H, W, C] (C = 1 or 3); rectified: [N, h, w] or [N, h, w, C];
    labels: optional N captions (e.g. true digits) shown above the inputs.
    """
    inputs = _images(inputs, "inputs")
    rectified = _images(rectified, "rectified")
    if len(rectified) != len(inputs):
        raise ValueError(f"rectified has {len(rectified)} images, inputs {len(inputs)}")
    labels = _captions(labels, len(inputs))
    figure, axes = _panels(2, len(inputs))
    for i in range(len(inputs)):
        _show(axes[0, i], inputs[i])
        _show(axes[1, i], rectified[i])
        if labels:
            axes[0, i].set_title(labels[i], fontsize=9)
    axes[0, 0].set_ylabel("input", fontsize=9)
    axes[1, 0].set_ylabel("rectified", fontsize=9)
    _save(figure, path, title)


def plot_sampling_grids(inputs, grids, path, align_corners=False, title=None):
    """Save a PNG: each input image with its sampling grid [h, w, 2] drawn over it.

    The outline (where the output image's border falls in the input) is drawn in full, and
    a few interior grid lines of each direction thinly.
    """
    inputs = _images(inputs, "inputs")
    grids = np.asarray(grids, dtype=float)
    if grids.ndim != 4 or grids.shape[-1] != 2 or len(grids) != len(inputs):
        raise ValueError(
            f"grids must have shape [N, h, w, 2] with N = {len(inputs)} inputs, got {grids.shape}"
        )
    height, width = inputs.shape[1:3]
    columns = min(len(inputs), 8)
    figure, axes = _panels(math.ceil(len(inputs) / columns), columns)
    for i, ax in enumerate(axes.ravel()):
        if i >= len(inputs):
            ax.set_visible(False)
            continue
        _show(ax, inputs[i])
        for line in _grid_lines(grids[i]):
            x, y = normalized_to_pixels(line, height, width, align_corners).T
            ax.plot(x, y, color="tab:orange", linewidth=0.6, alpha=0.8)
        x, y = normalized_to_pixels(grid_outline(grids[i]), height, width, align_corners).T
        ax.plot(x, y, color="tab:red", linewidth=1.2, clip_on=False)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
    _save(figure, path, title)


def plot_training_curves(histories, path, title=None):
    """Save a PNG with one panel per metric, one line per run.

    histories: {run name: {metric: [value per epoch]}}, e.g. {"cnn": model.fit(...).history}.
    A metric "val_x" is drawn dashed, with hollow markers, in the panel of "x".
    """
    if not isinstance(histories, dict) or not histories:
        raise ValueError("histories must be a non-empty dict {run name: {metric: values}}")
    metrics = []
    for run, history in histories.items():
        if not isinstance(history, dict) or not history:
            raise ValueError(f"histories[{run!r}] must be a non-empty dict {{metric: values}}")
        for name in history:
            base = name.removeprefix("val_")
            if base not in metrics:
                metrics.append(base)
    figure, axes = plt.subplots(
        1, len(metrics), figsize=(4 * len(metrics), 3.2), dpi=_DPI, squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics, strict=True):
        for k, (run, history) in enumerate(histories.items()):
            for prefix, style, fill in (("", "-", "full"), ("val_", "--", "none")):
                values = history.get(prefix + metric)
                if values is None:
                    continue
                epochs = np.arange(1, len(values) + 1)
                label = f"{run} ({'eval' if prefix else 'train'})"
                colour = colours[k % len(colours)]
                ax.plot(
                    epochs, values, style, marker="o", fillstyle=fill, color=colour, label=label
                )
        ax.set_xlabel("epoch")
        # whole epochs only, also for one epoch (the default min_n_ticks=2 falls back to 0.96, ...)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    _save(figure, path, title)


def plot_slice_metrics(metrics_by_slice, path, title=None, share_y=False):
    """Save a PNG bar chart: one panel per metric, one bar per slice.

    metrics_by_slice: {slice name: {metric: value}}, e.g. {"variant=rts": {"accuracy": 0.98}}.
    share_y: one y scale for all panels, for metrics to compare with each other.
    """
    if not isinstance(metrics_by_slice, dict) or not metrics_by_slice:
        raise ValueError("metrics_by_slice must be a non-empty dict {slice: {metric: value}}")
    metrics = []
    for name, values in metrics_by_slice.items():
        if not isinstance(values, dict) or not values:
            raise ValueError(f"metrics_by_slice[{name!r}] must be a non-empty dict")
        metrics.extend(m for m in values if m not in metrics)
    slices = list(metrics_by_slice)
    figure, axes = plt.subplots(
        len(metrics),
        1,
        figsize=(max(4, 0.8 * len(slices) + 2), 2.8 * len(metrics)),
        dpi=_DPI,
        squeeze=False,
        sharey=share_y,
    )
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        values = [float(metrics_by_slice[s].get(metric, np.nan)) for s in slices]
        bars = ax.bar(range(len(slices)), values, color="tab:blue")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(slices)), slices, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    _save(figure, path, title)


def _grid_lines(grid):
    """A few rows and columns of a grid [h, w, 2], as lines [n, 2]; outer ones excluded."""
    height, width = grid.shape[:2]
    rows = np.unique(np.linspace(0, height - 1, _GRID_LINES).round().astype(int))[1:-1]
    cols = np.unique(np.linspace(0, width - 1, _GRID_LINES).round().astype(int))[1:-1]
    return [grid[r] for r in rows] + [grid[:, c] for c in cols]


def _images(images, argument):
    """images as float [N, H, W] or [N, H, W, 3] in [0, 1] (integers are bytes, 0 to 255);
    ValueError on any other shape or if empty."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)) or not len(images):
        raise ValueError(
            f"{argument} must have shape [N, H, W] or [N, H, W, 1 or 3] with N >= 1, "
            f"got {images.shape}"
        )
    return images / 255.0 if np.issubdtype(images.dtype, np.integer) else images.astype(float)


def _captions(labels, count):
    if labels is None:
        return None
    labels = [str(label) for label in labels]
    if len(labels) != count:
        raise ValueError(f"labels has {len(labels)} entries for {count} images")
    return labels


def _panels(rows, columns):
    side = _CELL_INCHES
    return plt.subplots(
        rows, columns, figsize=(side * columns, side * rows + 0.4), dpi=_DPI, squeeze=False
    )


def _show(ax, image):
    # A fixed range, so that an all-dark image stays dark; a float32 sample may pass 1 by an ulp.
    if image.ndim == 3:
        ax.imshow(np.clip(image, 0.0, 1.0), interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(figure, path, title):
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        plt.close(figure)
        raise ValueError(f"path must name a .png file, got {path!r}")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
