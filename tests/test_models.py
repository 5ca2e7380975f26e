"""The paper's models: documented sizes, output shape, one training step, the rectifier."""

import functools

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from scipy import ndimage

from stn_model import MODEL_NAMES, build_model, rectifier
from stn_model.layers import COMPOSABLE_TRANSFORMS
from stn_model.models import find_spatial_transformer

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_builds_gives_probabilities_and_trains_one_step(name):
    keras.utils.set_random_seed(0)
    model = build_model(name, input_shape=(36, 32, 2), num_classes=7)
    assert model.input_shape == (None, 36, 32, 2)
    assert model.output_shape == (None, 7)
    assert model.output_names == ["probabilities"]
    x = RNG.random((4, 36, 32, 2), dtype=np.float32)
    y = np.array([0, 3, 6, 2])
    probabilities = model(x).numpy()
    assert probabilities.dtype == np.float32
    assert probabilities.min() >= 0
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", run_eagerly=True)
    before = [w.numpy() for w in model.trainable_weights]
    loss = model.train_on_batch(x, y)
    expected = -np.log(probabilities[np.arange(4), y]).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
    # Every weight moves, except the localization net's: under the zero-started head its
    # gradient is zero in the first step.
    frozen = set()
    if name.startswith("st_"):
        frozen = {w.name for w in find_spatial_transformer(model).localization_net.weights}
    for old, weight in zip(before, model.trainable_weights, strict=True):
        assert np.array_equal(old, weight.numpy()) == (weight.name in frozen), weight.name


def test_the_pipeline_config_knows_every_model():
    from pipeline.configs import EQUIVARIANT_MODELS, MODELS  # TF-free copies of the names

    assert MODELS == MODEL_NAMES
    composable = [
        name
        for name in MODEL_NAMES
        if name.startswith("st_")
        and find_spatial_transformer(build_model(name)).transform in COMPOSABLE_TRANSFORMS
    ]
    assert tuple(composable) == EQUIVARIANT_MODELS


def dense_units(layers):
    return [layer.units for layer in layers if isinstance(layer, keras.layers.Dense)]


def conv_kernels(layers):
    return [tuple(layer.kernel.shape) for layer in layers if isinstance(layer, keras.layers.Conv2D)]


def test_cnn_has_the_documented_sizes():
    model = build_model("cnn")
    assert conv_kernels(model.layers) == [(9, 9, 1, 32), (7, 7, 32, 32)]
    assert dense_units(model.layers) == [10]
    # 42 -> conv 9 -> 34 -> pool -> 17 -> conv 7 -> 11 -> pool -> 5: 5 * 5 * 32 features.
    assert model.get_layer("probabilities").kernel.shape == (800, 10)


@pytest.mark.parametrize(
    ("name", "transform", "head_units"),
    [
        ("st_cnn_affine", "affine", 6),
        ("st_cnn_similarity", "similarity", 4),
        ("st_cnn_projective", "projective", 8),
        ("st_cnn_tps", "tps", 32),
    ],
)
def test_st_cnn_has_the_documented_sizes(name, transform, head_units):
    model = build_model(name)
    transformer = find_spatial_transformer(model)
    assert (transformer.transform, transformer.output_size) == (transform, (28, 28))
    localization = transformer.localization_net.layers
    assert conv_kernels(localization) == [(5, 5, 1, 20), (5, 5, 20, 20)]
    # 42 -> pool 21 -> conv (same) -> pool 10 -> conv (same) -> pool 5: 5 * 5 * 20 features.
    assert transformer.head.kernel.shape == (500, head_units)
    assert conv_kernels(model.layers) == [(9, 9, 1, 32), (7, 7, 32, 32)]
    # The classifier sees 28 x 28: 28 -> 20 -> 10 -> 4 -> 2, so 2 * 2 * 32 features.
    assert model.get_layer("probabilities").kernel.shape == (128, 10)


def test_full_resolution_localization_drops_only_the_first_pool():
    model = build_model("st_cnn_tps", full_resolution_localization=True)
    transformer = find_spatial_transformer(model)
    localization = transformer.localization_net.layers
    assert isinstance(localization[0], keras.layers.Conv2D)
    assert conv_kernels(localization) == [(5, 5, 1, 20), (5, 5, 20, 20)]
    # 42 -> conv (same) -> pool 21 -> conv (same) -> pool 10: 10 * 10 * 20 features.
    assert transformer.head.kernel.shape == (2000, 32)
    assert model.get_layer("probabilities").kernel.shape == (128, 10)
    # Models without a CNN localization net do not change.
    for name in ("cnn", "st_fcn"):
        built = build_model(name, full_resolution_localization=True)
        assert built.count_params() == build_model(name).count_params()


def test_localization_hidden_units_end_the_localization_net():
    model = build_model("st_cnn_affine", localization_hidden_units=50)
    transformer = find_spatial_transformer(model)
    localization = transformer.localization_net.layers
    assert conv_kernels(localization) == [(5, 5, 1, 20), (5, 5, 20, 20)]
    assert dense_units(localization) == [50]
    assert localization[-1].kernel.shape == (500, 50)  # the pooled 5 * 5 * 20 maps
    assert transformer.head.kernel.shape == (50, 6)
    # Models without a CNN localization net do not change.
    for name in ("cnn", "st_fcn"):
        built = build_model(name, localization_hidden_units=50)
        assert built.count_params() == build_model(name).count_params()
    for bad in (0, -3, 2.5, True, "50"):
        with pytest.raises(ValueError, match="localization_hidden_units"):
            build_model("st_cnn_affine", localization_hidden_units=bad)


def test_fcn_and_st_fcn_have_the_documented_sizes():
    assert dense_units(build_model("fcn").layers) == [128, 128, 128, 10]
    model = build_model("st_fcn")
    assert dense_units(model.layers) == [128, 128, 128, 10]
    transformer = find_spatial_transformer(model)
    assert dense_units(transformer.localization_net.layers) == [32, 32, 32]
    assert (transformer.transform, transformer.head.units) == ("affine", 6)
    assert model.layers[-4].kernel.shape == (28 * 28, 128)


def test_st_iterations_reach_the_transformer():
    once = build_model("st_cnn_projective")
    twice = build_model("st_cnn_projective", st_iterations=2)
    assert find_spatial_transformer(twice).iterations == 2
    assert twice.count_params() == once.count_params()  # the passes share their weights
    # TPS passes add an affine head of 6 units on the 500 pooled features.
    tps_once, tps_twice = build_model("st_cnn_tps"), build_model("st_cnn_tps", st_iterations=2)
    assert tps_twice.count_params() == tps_once.count_params() + 500 * 6 + 6


def test_tps_grid_size_sets_the_head():
    model = build_model("st_cnn_tps", tps_grid_size=3)
    assert find_spatial_transformer(model).head.units == 18


def test_rectifier_is_the_trained_transformer_output():
    model = build_model("st_cnn_affine", st_output_size=(30, 24))
    rectify = rectifier(model)
    assert rectify.output_shape == (None, 30, 24, 1)
    transformer = find_spatial_transformer(model)
    kernel = transformer.head.get_weights()[0]
    # A trained-looking head: zoom in by 2 on the right half, whatever the input.
    transformer.head.set_weights([kernel, np.array([0.5, 0, 0.5, 0, 0.5, 0], np.float32)])
    x = RNG.random((2, 42, 42, 1), dtype=np.float32)
    rectified = rectify(x, training=False).numpy()
    expected, parameters, _ = transformer.rectify(x)
    np.testing.assert_array_equal(rectified, expected.numpy())
    np.testing.assert_array_equal(parameters.numpy(), [[0.5, 0, 0.5, 0, 0.5, 0]] * 2)
    # Output pixel centre (u, v) in [-1, 1] reads input (0.5 u + 0.5, 0.5 v), in pixels
    # ((c + 1) * 42 - 1) / 2 (align_corners=False). The last column reads x = 41.06, past the
    # last pixel centre: zero padding there is SciPy's "grid-constant" mode.
    u = 0.5 * ((2 * np.arange(24) + 1) / 24 - 1) + 0.5
    v = 0.5 * ((2 * np.arange(30) + 1) / 30 - 1)
    rows, cols = np.meshgrid(((v + 1) * 42 - 1) / 2, ((u + 1) * 42 - 1) / 2, indexing="ij")
    for b in range(2):
        oracle = ndimage.map_coordinates(x[b, ..., 0], [rows, cols], order=1, mode="grid-constant")
        np.testing.assert_allclose(rectified[b, ..., 0], oracle, atol=1e-5)


def test_rectifier_is_none_without_a_transformer_and_find_needs_one():
    model = build_model("cnn")
    assert rectifier(model) is None
    with pytest.raises(ValueError, match="exactly one SpatialTransformer"):
        find_spatial_transformer(model)


def test_models_build_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("st_cnn_affine")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    transformer = find_spatial_transformer(model)
    assert transformer.compute_dtype == "float16"
    assert transformer.head.compute_dtype == "float32"
    probabilities = model(RNG.random((2, 42, 42, 1), dtype=np.float32))
    assert probabilities.dtype == tf.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet"}, "name must be one of"),
        ({"name": "cnn", "input_shape": (42, 42)}, "input_shape must be 3 positive integers"),
        ({"name": "cnn", "input_shape": (20, 42, 1)}, "input_shape: the CNN classifier needs"),
        ({"name": "st_cnn_affine", "st_output_size": (16, 16)}, "st_output_size: the CNN"),
        ({"name": "fcn", "num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"name": "st_fcn", "st_iterations": 0}, "st_iterations must be an integer >= 1"),
        (
            {"name": "st_cnn_affine", "input_shape": (7, 7, 1)},
            r"input_shape: the ST-CNN's localization net needs .* 8 x 8, got \(7, 7\)",
        ),
        (
            {"name": "st_cnn_tps", "input_shape": (3, 9, 1), "full_resolution_localization": True},
            r"localization net needs images of at least 4 x 4, got \(3, 9\)",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)


def test_the_smallest_inputs_the_localization_net_takes_build_and_run():
    # Three 2x2 pools take 8 x 8 to 1 x 1; without the first, two take 4 x 4 there.
    for side, full_resolution in ((8, False), (4, True)):
        model = build_model(
            "st_cnn_affine",
            input_shape=(side, side, 1),
            num_classes=np.int64(3),  # e.g. labels.max() + 1
            full_resolution_localization=full_resolution,
        )
        assert model(np.zeros((2, side, side, 1), np.float32)).shape == (2, 3)


@functools.cache
def _architecture(name, option=None):
    """The config of model `name` built with `option` (a (name, value) pair) or none."""
    keras.backend.clear_session()  # layer names restart, so equal models give equal configs
    return build_model(name, **dict([option] if option else [])).get_config()


@pytest.mark.parametrize(
    "option",
    [
        ("st_iterations", 2),
        ("full_resolution_localization", True),
        ("localization_hidden_units", 50),
    ],
)
def test_a_config_takes_a_transformer_option_for_exactly_the_models_it_changes(option):
    from pipeline.configs import PipelineConfig

    def accepted(name):
        try:
            PipelineConfig(model=name, **dict([option]))
        except ValueError:
            return False
        return True

    changes = {name: _architecture(name, option) != _architecture(name) for name in MODEL_NAMES}
    assert {name: accepted(name) for name in MODEL_NAMES} == changes
    assert any(changes.values()) and not all(changes.values())
