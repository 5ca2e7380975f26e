"""stn_model.visualize: the coordinate conversion against hand-computed values, and real PNGs."""

import numpy as np
import pytest
from PIL import Image

from stn_model import affine_grid, visualize
from stn_model.visualize import (
    grid_outline,
    normalized_to_pixels,
    plot_rectification,
    plot_sampling_grids,
    plot_slice_metrics,
    plot_training_curves,
)


def test_normalized_corners_are_pixel_edges_without_align_corners():
    # A 30-row, 42-column image: imshow draws it over x in [-0.5, 41.5], y in [-0.5, 29.5].
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [0, 0]])
    pixels = normalized_to_pixels(corners, height=30, width=42)
    np.testing.assert_allclose(
        pixels, [[-0.5, -0.5], [41.5, -0.5], [41.5, 29.5], [-0.5, 29.5], [20.5, 14.5]]
    )


def test_normalized_corners_are_pixel_centres_with_align_corners():
    pixels = normalized_to_pixels([[-1, -1], [1, 1]], height=30, width=42, align_corners=True)
    np.testing.assert_allclose(pixels, [[0, 0], [41, 29]])


def test_normalized_pixel_centres_round_trip_through_affine_grid_steps():
    # Without align_corners, output pixel j of a W-wide identity grid samples input pixel j.
    grid = affine_grid(np.array([[1, 0, 0, 0, 1, 0]], np.float32), (6, 9)).numpy()[0]
    pixels = normalized_to_pixels(grid, height=6, width=9)
    rows, cols = np.mgrid[0:6, 0:9]
    np.testing.assert_allclose(pixels[..., 0], cols, atol=1e-5)
    np.testing.assert_allclose(pixels[..., 1], rows, atol=1e-5)


def test_identity_grid_outline_runs_along_the_image_border():
    # A 7 x 5 output grid drawn over a 42 x 30 input: sizes differ, corners still coincide.
    grid = affine_grid(np.array([[1, 0, 0, 0, 1, 0]], np.float32), (7, 5)).numpy()[0]
    outline = normalized_to_pixels(grid_outline(grid), height=30, width=42)
    assert outline.shape == (2 * (7 + 5) + 1, 2)
    np.testing.assert_allclose(outline[0], outline[-1])  # closed
    corners = {tuple(np.round(p, 5)) for p in outline}
    assert {(-0.5, -0.5), (41.5, -0.5), (41.5, 29.5), (-0.5, 29.5)} <= corners
    on_border = np.isclose(outline[:, 0], -0.5) | np.isclose(outline[:, 0], 41.5)
    on_border |= np.isclose(outline[:, 1], -0.5) | np.isclose(outline[:, 1], 29.5)
    assert on_border.all()


def test_affine_grid_outline_corners_are_the_transformed_unit_square():
    # x' = 0.5 x - 0.2 y + 0.1, y' = 0.3 x + 0.6 y - 0.25, applied by hand to the corners.
    theta = np.array([[0.5, -0.2, 0.1, 0.3, 0.6, -0.25]], np.float32)
    grid = affine_grid(theta, (8, 6)).numpy()[0]
    outline = grid_outline(grid)
    expected = [
        (0.5 * x - 0.2 * y + 0.1, 0.3 * x + 0.6 * y - 0.25)
        for x, y in [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    ]
    # Corners sit at indices 0, W, W + H, 2W + H of the outline (top, right, bottom, left).
    np.testing.assert_allclose(outline[[0, 6, 14, 20]], expected, atol=1e-5)


@pytest.mark.parametrize(
    "grid", [np.zeros((1, 5, 2)), np.zeros((4, 4, 3)), np.zeros((4, 4))], ids=str
)
def test_grid_outline_rejects_bad_shapes(grid):
    with pytest.raises(ValueError, match="grid must have shape"):
        grid_outline(grid)


def assert_png(path, min_size=(150, 100), max_size=(3000, 3000)):
    """The file is a PNG of a sensible size with more than a background in it."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1]
    _, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert len(counts) >= 4 and counts.max() < 0.95 * counts.sum()  # not blank


@pytest.fixture
def digits():
    rng = np.random.default_rng(0)
    return rng.random((5, 42, 42, 1)).astype(np.float32)


def test_plot_rectification_writes_png(tmp_path, digits):
    path = tmp_path / "sub" / "rectification.png"
    plot_rectification(digits, digits[:, 7:35, 7:35], path, labels=[1, 2, 3, 4, 5], title="t")
    assert_png(path)


def test_images_show_on_one_scale_bytes_as_255_and_floats_an_ulp_past_1_as_1():
    import matplotlib.pyplot as plt

    white = np.ones((1, 4, 4), np.float32)
    white[0, 0, 0] = np.nextafter(np.float32(1), np.float32(2))  # a float32 bilinear sample
    assert visualize._images(np.full((1, 4, 4), 255, np.uint8), "x").max() == 1.0
    figure, ax = plt.subplots()
    visualize._show(ax, visualize._images(white, "x")[0])
    assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (0.0, 1.0)
    plt.close(figure)


def test_plot_sampling_grids_writes_png_and_draws_the_outline(tmp_path):
    # Black inputs: anything red in the picture is the drawn grid outline.
    inputs = np.zeros((3, 42, 42))
    theta = np.tile(np.array([[0.5, 0, 0, 0, 0.5, 0]], np.float32), (3, 1))
    path = tmp_path / "grids.png"
    plot_sampling_grids(inputs, affine_grid(theta, (28, 28)).numpy(), path)
    assert_png(path, min_size=(150, 60))
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 50


def test_plot_training_curves_writes_png(tmp_path):
    histories = {
        "cnn": {"loss": [2.0, 1.0, 0.5], "val_loss": [2.1, 1.2, 0.7], "accuracy": [0.3, 0.6, 0.9]},
        "st_cnn_affine": {"loss": [1.8, 0.8, 0.3], "val_loss": [1.9, 0.9, 0.5]},
    }
    path = tmp_path / "curves.png"
    plot_training_curves(histories, path)
    assert_png(path)


def test_one_epoch_curves_tell_train_from_eval_on_whole_epochs(tmp_path, monkeypatch):
    # One epoch draws one point per line: no dash to tell eval from train, no range of epochs.
    saved = []
    monkeypatch.setattr(visualize, "_save", lambda figure, path, title: saved.append(figure))
    plot_training_curves({"model": {"loss": [2.3], "val_loss": [2.2]}}, tmp_path / "x.png")
    [ax] = saved[0].axes
    train, evaluation = ax.get_legend().legend_handles
    assert (train.get_marker(), train.get_fillstyle()) != (
        evaluation.get_marker(),
        evaluation.get_fillstyle(),
    )
    saved[0].canvas.draw()
    low, high = ax.get_xlim()
    shown = [tick for tick in ax.get_xticks() if low <= tick <= high]
    assert shown == [1.0]


def test_plot_slice_metrics_writes_png(tmp_path):
    path = tmp_path / "slices.png"
    plot_slice_metrics(
        {"variant=r": {"accuracy": 0.97}, "variant=rts": {"accuracy": 0.99, "loss": 0.1}}, path
    )
    assert_png(path)


@pytest.mark.parametrize("share_y", [False, True])
def test_plot_slice_metrics_shares_the_y_scale_on_request(tmp_path, monkeypatch, share_y):
    saved = []
    monkeypatch.setattr(visualize, "_save", lambda figure, path, title: saved.append(figure))
    metrics = {"0-15": {"cnn": 2.5, "st": 1.6}, "45-90": {"cnn": 4.0, "st": 2.3}}
    plot_slice_metrics(metrics, tmp_path / "x.png", share_y=share_y)
    top_cnn, top_st = (ax.get_ylim()[1] for ax in saved[0].axes)
    assert top_cnn >= 4.0 and top_st >= 2.3
    assert (top_cnn == top_st) == share_y


def test_plots_reject_bad_input(tmp_path, digits):
    with pytest.raises(ValueError, match=r"path must name a \.png file"):
        plot_rectification(digits, digits, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="rectified has 2 images, inputs 5"):
        plot_rectification(digits, digits[:2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels has 1 entries for 5 images"):
        plot_rectification(digits, digits, tmp_path / "x.png", labels=[1])
    with pytest.raises(ValueError, match="inputs must have shape"):
        plot_rectification(digits[:, :, :, 0, None, None], digits, tmp_path / "x.png")
    with pytest.raises(ValueError, match="grids must have shape"):
        plot_sampling_grids(digits, np.zeros((4, 5, 5, 2)), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"histories\['cnn'\] must be a non-empty dict"):
        plot_training_curves({"cnn": {}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="metrics_by_slice must be a non-empty dict"):
        plot_slice_metrics({}, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
