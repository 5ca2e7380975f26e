"""SpatialTransformer: identity start, serialization, saving, mixed precision, learning."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from scipy import ndimage
from sklearn.datasets import load_digits
from test_sampling import MODES, reference_sample

from stn_model import SpatialTransformer, affine_grid, bilinear_sample
from stn_model.grids import projective_grid, similarity_grid, tps_control_points, tps_grid
from stn_model.layers import TRANSFORMS, identity_parameters

RNG = np.random.default_rng(0)


def small_localization():
    return keras.Sequential(
        [keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.GlobalAveragePooling2D()]
    )


def images(batch=3, height=12, width=10, channels=2):
    return RNG.random((batch, height, width, channels), dtype=np.float32)


def perturb_head(layer, scale=0.05):
    """Moves the heads off the identity so outputs depend on the input (and on every weight)."""
    for head in (layer.head, layer.affine_head):
        if head is not None:
            kernel, bias = head.get_weights()
            head.set_weights([RNG.normal(0, scale, kernel.shape).astype(np.float32), bias])


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_identity_at_initialisation_returns_the_input(transform):
    x = images()
    layer = SpatialTransformer(small_localization(), (12, 10), transform=transform)
    rectified, parameters, grid = layer.rectify(x)
    np.testing.assert_allclose(rectified.numpy(), x, atol=1e-5)
    identity = identity_parameters(transform)
    np.testing.assert_array_equal(parameters.numpy(), np.tile(identity, (3, 1)))
    assert grid.shape == (3, 12, 10, 2)


def test_identity_parameters_match_the_grid_generators_conventions():
    np.testing.assert_array_equal(identity_parameters("affine"), [1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(identity_parameters("projective"), [1, 0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(identity_parameters("similarity"), [1, 0, 0, 0])
    np.testing.assert_array_equal(identity_parameters("tps", 3), tps_control_points(3).ravel())
    assert identity_parameters("tps", 5).shape == (50,)


def test_identity_downscale_equals_bilinear_resampling():
    # Output pixel (i, j) of a 42 -> 28 identity samples input pixel ((i + 0.5) * 1.5 - 0.5):
    # align_corners=False maps the outer pixel edges onto each other.
    x = images(batch=2, height=42, width=42, channels=1)
    layer = SpatialTransformer(small_localization(), (28, 28))
    rectified = layer(x).numpy()
    centres = (np.arange(28) + 0.5) * 42 / 28 - 0.5
    rows, cols = np.meshgrid(centres, centres, indexing="ij")
    for b in range(2):
        expected = ndimage.map_coordinates(x[b, ..., 0], [rows, cols], order=1)
        np.testing.assert_allclose(rectified[b, ..., 0], expected, atol=1e-5)
    grid = affine_grid(np.tile(identity_parameters("affine"), (2, 1)), (28, 28))
    np.testing.assert_allclose(rectified, bilinear_sample(x, grid).numpy(), atol=1e-6)


@pytest.mark.parametrize(("padding_mode", "align_corners"), MODES)
def test_padding_mode_and_align_corners_reach_the_grid_and_the_sampler(padding_mode, align_corners):
    # A constant head that zooms out and shifts: edge points read outside the input.
    theta = np.array([[1.3, 0.2, 0.3], [-0.1, 1.2, -0.2]])
    layer = SpatialTransformer(
        small_localization(), (7, 9), padding_mode=padding_mode, align_corners=align_corners
    )
    x = images()
    layer(x)
    kernel, _ = layer.head.get_weights()
    layer.head.set_weights([kernel, np.float32(theta.ravel())])
    # The output pixel centres in [-1, 1] (PyTorch's convention), mapped by theta in NumPy.
    if align_corners:
        rows, cols = np.meshgrid(np.linspace(-1, 1, 7), np.linspace(-1, 1, 9), indexing="ij")
    else:
        rows, cols = np.meshgrid(*((2 * np.arange(n) + 1) / n - 1 for n in (7, 9)), indexing="ij")
    centres = np.stack([cols, rows, np.ones_like(rows)], axis=-1)
    grid = np.tile(centres @ theta.T, (3, 1, 1, 1))
    expected = reference_sample(x, grid, padding_mode, align_corners)
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-5)


def test_head_has_the_transform_size_and_starts_at_zero_kernel_identity_bias():
    layer = SpatialTransformer(small_localization(), (8, 8), transform="tps", tps_grid_size=3)
    layer(images())
    kernel, bias = layer.head.get_weights()
    assert kernel.shape == (4, 18)
    assert not kernel.any()
    np.testing.assert_array_equal(bias, tps_control_points(3).ravel())
    localization_weights = {id(w) for w in layer.localization_net.weights}
    assert localization_weights <= {id(w) for w in layer.trainable_weights}


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_get_config_from_config_round_trip(transform):
    layer = SpatialTransformer(
        small_localization(),
        (6, 5),
        transform=transform,
        tps_grid_size=3,
        padding_mode="border",
        align_corners=True,
        name="st",
    )
    x = images()
    layer(x)
    perturb_head(layer)
    config = layer.get_config()
    clone = SpatialTransformer.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.localization_net, keras.Sequential)
    assert (clone.output_size, clone.transform, clone.padding_mode) == ((6, 5), transform, "border")
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x).numpy(), layer(x).numpy())


def sequential_model(transform="affine", iterations=1):
    return keras.Sequential(
        [
            keras.Input((12, 10, 2)),
            SpatialTransformer(
                small_localization(), (8, 8), transform=transform, iterations=iterations
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def test_works_in_sequential_and_functional_models():
    x = images()
    sequential = sequential_model()
    assert sequential.layers[0].compute_output_shape((None, 12, 10, 2)) == (None, 8, 8, 2)
    assert sequential.output_shape == (None, 3)
    inputs = keras.Input((12, 10, 2))
    transformer = SpatialTransformer(small_localization(), (8, 8))
    rectified = transformer(inputs)
    functional = keras.Model(inputs, [keras.layers.Flatten()(rectified), rectified])
    flat, out = functional(x)
    assert out.shape == (3, 8, 8, 2)
    np.testing.assert_array_equal(flat.numpy(), out.numpy().reshape(3, -1))
    head_weights = {id(w) for w in transformer.head.weights}
    assert head_weights <= {id(w) for w in functional.trainable_weights}


@pytest.mark.parametrize(
    ("transform", "path", "iterations"),
    [
        ("affine", "model.keras", 1),
        ("projective", "model.h5", 1),
        ("tps", "model.keras", 1),
        ("affine", "saved_model", 1),
        ("projective", "model.keras", 2),
        ("similarity", "model.keras", 2),
        ("tps", "model.h5", 3),
        ("affine", "saved_model", 2),
    ],
)
def test_model_saves_and_reloads_with_identical_outputs(tmp_path, transform, path, iterations):
    model = sequential_model(transform, iterations)
    perturb_head(model.layers[0])
    x = images()
    expected = model(x).numpy()
    model.save(tmp_path / path)
    reloaded = keras.models.load_model(tmp_path / path)
    assert isinstance(reloaded.layers[0], SpatialTransformer)
    assert (reloaded.layers[0].transform, reloaded.layers[0].iterations) == (transform, iterations)
    np.testing.assert_array_equal(reloaded(x).numpy(), expected)


def test_saved_model_serves_without_the_layer_class(tmp_path):
    model = sequential_model("tps")
    perturb_head(model.layers[0])
    x = images()
    tf.saved_model.save(model, str(tmp_path))
    served = tf.saved_model.load(str(tmp_path)).signatures["serving_default"]
    (output,) = served(tf.constant(x)).values()
    np.testing.assert_allclose(output.numpy(), model(x).numpy(), atol=1e-6)


def as_matrix(parameters, transform):
    """Flat affine (6), similarity (4) or projective (8) parameters -> 3 x 3 NumPy matrix."""
    if transform == "similarity":
        a, b, tx, ty = parameters
        return np.array([[a, -b, tx], [b, a, ty], [0, 0, 1]], np.float64)
    last = [0, 0, 1] if transform == "affine" else [1]
    return np.append(np.asarray(parameters, np.float64), last).reshape(3, 3)


def as_parameters(matrix, transform):
    """3 x 3 NumPy matrix -> flat parameters, the inverse of `as_matrix`."""
    if transform == "similarity":
        return matrix[[0, 1, 0, 1], [0, 0, 2, 2]]
    return (matrix / matrix[2, 2]).ravel()[: 6 if transform == "affine" else 8]


GRID_GENERATORS = {
    "affine": affine_grid,
    "similarity": similarity_grid,
    "projective": projective_grid,
}


@pytest.mark.parametrize(
    ("transform", "parameters"),
    [
        ("affine", [0.9, -0.3, 0.1, 0.25, 0.8, -0.05]),
        ("similarity", [0.8, 0.45, 0.1, -0.05]),
        ("projective", [0.9, -0.3, 0.1, 0.25, 0.8, -0.05, 0.1, -0.2]),
    ],
)
def test_iterations_compose_the_transform_with_itself_for_a_constant_head(transform, parameters):
    # A zero-kernel head predicts the same transform on every pass: three passes give M @ M @ M.
    layer = SpatialTransformer(small_localization(), (9, 7), transform=transform, iterations=3)
    x = images()
    layer(x)
    kernel, _ = layer.head.get_weights()
    layer.head.set_weights([kernel, np.float32(parameters)])
    expected = as_parameters(np.linalg.matrix_power(as_matrix(parameters, transform), 3), transform)
    rectified, composed, grid = layer.rectify(x)
    np.testing.assert_allclose(composed.numpy(), np.tile(expected, (3, 1)), atol=1e-5)
    expected_grid = GRID_GENERATORS[transform](
        np.tile(np.float32(expected), (3, 1)), (9, 7)
    ).numpy()
    np.testing.assert_allclose(grid.numpy(), expected_grid, atol=1e-5)
    np.testing.assert_allclose(
        rectified.numpy(), bilinear_sample(x, expected_grid).numpy(), atol=1e-5
    )


def test_each_iteration_looks_at_the_input_warped_by_the_transform_so_far():
    layer = SpatialTransformer(small_localization(), (6, 5), iterations=2)
    x = images()
    layer(x)
    perturb_head(layer, scale=0.5)
    first = layer.transform_parameters(x).numpy()
    warped = bilinear_sample(x, affine_grid(first, (12, 10)))
    second = layer.transform_parameters(warped).numpy()
    expected = [
        (as_matrix(a, "affine") @ as_matrix(b, "affine")).ravel()[:6]
        for a, b in zip(first, second, strict=True)
    ]
    assert np.abs(second - identity_parameters("affine")).max() > 1e-2  # a real correction
    np.testing.assert_allclose(layer.rectify(x)[1].numpy(), expected, atol=1e-5)


def tps_layer_with_a_constant_affine(affine, iterations):
    """A TPS transformer of `iterations` passes whose affine head always predicts `affine` and
    whose spline head looks at the image."""
    layer = SpatialTransformer(small_localization(), (9, 7), transform="tps", iterations=iterations)
    x = images()
    layer(x)
    perturb_head(layer, scale=0.5)
    kernel, _ = layer.affine_head.get_weights()
    layer.affine_head.set_weights([np.zeros_like(kernel), np.float32(affine)])
    return layer, x


@pytest.mark.parametrize("iterations", [2, 3])
def test_tps_iterations_find_an_affine_then_the_spline_on_the_image_it_rectified(iterations):
    affine = [0.9, -0.3, 0.1, 0.25, 0.8, -0.05]
    layer, x = tps_layer_with_a_constant_affine(affine, iterations)
    # N - 1 passes of a constant affine head compose to its matrix to the power N - 1.
    matrix = np.linalg.matrix_power(as_matrix(affine, "affine"), iterations - 1)
    warped = bilinear_sample(x, affine_grid(np.tile(np.float32(matrix[:2]), (3, 1, 1)), (12, 10)))
    targets = layer.transform_parameters(warped).numpy().reshape(3, 16, 2)
    assert np.abs(targets - tps_control_points(4)).max() > 1e-2  # a real spline
    rectified, parameters, grid = layer.rectify(x)
    # The composed warp: each output pixel samples the affine image of the spline's point.
    spline = tps_grid(targets, (9, 7)).numpy()
    expected_grid = spline @ matrix[:2, :2].T + matrix[:2, 2]
    np.testing.assert_allclose(grid.numpy(), expected_grid, atol=1e-5)
    mapped_targets = targets @ matrix[:2, :2].T + matrix[:2, 2]
    np.testing.assert_allclose(parameters.numpy(), mapped_targets.reshape(3, 32), atol=1e-5)
    np.testing.assert_allclose(
        rectified.numpy(), bilinear_sample(x, expected_grid).numpy(), atol=1e-5
    )


def test_one_pass_tps_has_no_affine_head():
    layer = SpatialTransformer(small_localization(), (4, 4), transform="tps")
    assert layer.affine_head is None
    layer(images())
    assert [w.shape for w in layer.head.weights] == [(4, 32), (32,)]


@pytest.mark.parametrize("transform", ["affine", "tps"])
def test_an_unbuilt_layer_with_iterations_rectifies_and_builds_itself(transform):
    x = images()
    layer = SpatialTransformer(small_localization(), (12, 10), transform=transform, iterations=3)
    rectified, parameters, _ = layer.rectify(x)
    assert layer.built and layer.input_size == (12, 10)
    np.testing.assert_allclose(rectified.numpy(), x, atol=1e-5)  # the identity at initialisation
    np.testing.assert_allclose(parameters.numpy(), layer.find_transform(x).numpy())
    fresh = SpatialTransformer(small_localization(), (12, 10), transform=transform, iterations=3)
    assert fresh.find_transform(x).shape == parameters.shape


def test_tps_grid_size_is_ignored_by_other_transforms():
    layer = SpatialTransformer(small_localization(), (6, 5), transform="affine", tps_grid_size=1)
    x = images()
    np.testing.assert_allclose(layer(x).numpy(), bilinear_sample(x, layer.rectify(x)[2]).numpy())
    clone = SpatialTransformer.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.tps_grid_size == 1 and clone.head.units == 6


def test_iterations_need_a_fixed_input_size():
    layer = SpatialTransformer(small_localization(), (4, 4), iterations=2)
    with pytest.raises(ValueError, match="fixed height and width"):
        layer(keras.Input((None, None, 1)))


def test_iterations_keep_the_input_size_they_were_built_for():
    # The later passes warp to the built size: another size must be refused, not half-used.
    layer = SpatialTransformer(small_localization(), (4, 4), iterations=2)
    layer(images(height=12, width=10))
    with pytest.raises(ValueError, match="expected axis 1 of input shape to have value 12"):
        layer(images(height=24, width=20))


def test_a_keras_3_localization_net_is_named_as_such():
    keras_3 = pytest.importorskip("keras")
    net = keras_3.Sequential([keras_3.layers.Flatten()])
    with pytest.raises(ValueError, match=r"tf_keras .* got a Keras 3 Sequential"):
        SpatialTransformer(net, (4, 4))


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_computes_the_transform_in_float32(mixed_precision):
    x = images(height=16, width=16)
    layer = SpatialTransformer(small_localization(), (16, 16), transform="projective")
    rectified = layer(x)
    assert rectified.dtype == tf.float16
    assert layer.localization_net.compute_dtype == "float16"
    assert layer.head.kernel.dtype == tf.float32
    _, parameters, grid = layer.rectify(x)
    assert (parameters.dtype, grid.dtype) == (tf.float32, tf.float32)
    perturb_head(layer, scale=0.5)
    moved = layer(x).numpy().astype(np.float32)
    parameters = layer.transform_parameters(x)
    grid = layer.rectify(x)[2]  # float32: the layer samples at unrounded coordinates
    # The sampling computes in float32 and rounds its result to float16 once.
    expected = bilinear_sample(tf.cast(tf.cast(x, tf.float16), tf.float32), grid)
    assert np.abs(parameters.numpy() - identity_parameters("projective")).max() > 1e-3
    np.testing.assert_array_equal(moved, tf.cast(tf.cast(expected, tf.float16), tf.float32))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transform": "rigid"}, "transform must be one of"),
        ({"output_size": (0, 4)}, "output_size must be positive"),
        ({"output_size": "big"}, "output_size must be"),
        ({"padding_mode": "reflect"}, "padding_mode must be one of"),
        ({"transform": "tps", "tps_grid_size": 1}, "tps_grid_size must be"),
        ({"localization_net": np.zeros(3)}, "must be a tf_keras .* got ndarray"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
        ({"iterations": True}, "iterations must be an integer >= 1"),
        ({"align_corners": "False"}, "align_corners must be True or False, got 'False'"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    arguments = {"localization_net": small_localization(), "output_size": (4, 4), **kwargs}
    with pytest.raises(ValueError, match=message):
        SpatialTransformer(**arguments)


def shifted_digits(count, canvas=14, seed=0):
    """sklearn's 8x8 digits at random places of a zero canvas: images [N, C, C, 1], labels."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(digits.images), count)
    offsets = rng.integers(0, canvas - 8 + 1, size=(count, 2))
    out = np.zeros((count, canvas, canvas, 1), np.float32)
    for n, (i, (row, col)) in enumerate(zip(index, offsets, strict=True)):
        out[n, row : row + 8, col : col + 8, 0] = digits.images[i] / 16.0
    return out, digits.target[index]


def linear_st_classifier(learn_transform):
    """ST (identity-started affine) -> softmax on the pixels; the transformer frozen or not."""
    localization = keras.Sequential(
        [keras.layers.Flatten(), keras.layers.Dense(32, activation="relu")]
    )
    transformer = SpatialTransformer(localization, (14, 14), trainable=learn_transform)
    model = keras.Sequential(
        [
            keras.Input((14, 14, 1)),
            transformer,
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", ["accuracy"])
    return model, transformer


def accuracy_on(model, images, labels):
    return np.mean(np.argmax(model(images).numpy(), axis=1) == labels)


def test_the_layer_learns_on_shifted_digits():
    # A linear classifier cannot undo the shifts; with the transformer learning it can.
    keras.utils.set_random_seed(0)
    x_train, y_train = shifted_digits(2048, seed=1)
    x_test, y_test = shifted_digits(512, seed=2)
    accuracy = {}
    for learn_transform in (False, True):
        model, transformer = linear_st_classifier(learn_transform)
        before = accuracy_on(model, x_test, y_test)
        model.fit(x_train, y_train, batch_size=64, epochs=3, verbose=0)
        accuracy[learn_transform] = accuracy_on(model, x_test, y_test)
        assert accuracy[learn_transform] > before
    parameters = transformer.transform_parameters(x_test).numpy()
    moved = np.abs(parameters - identity_parameters("affine")).mean(axis=0)
    assert moved.max() > 0.1
    assert accuracy[True] > accuracy[False] + 0.1
