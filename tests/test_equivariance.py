"""Rotation equivariance loss: turned images, the loss against NumPy, the training wrapper."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from stn_model import SpatialTransformer, affine_grid, bilinear_sample, build_model
from stn_model.equivariance import (
    RotationEquivariance,
    equivariance_loss,
    turned,
    with_rotation_equivariance,
)

RNG = np.random.default_rng(3)


def square_images(batch=2, size=8, channels=1):
    return RNG.random((batch, size, size, channels), dtype=np.float32)


def constant_transformer(transform, parameters, size=8):
    """A transformer whose head predicts `parameters` whatever the image (zero kernel)."""
    layer = SpatialTransformer(
        keras.layers.GlobalAveragePooling2D(), (size, size), transform=transform
    )
    layer(np.zeros((1, size, size, 1), np.float32))  # builds the head
    kernel, _ = layer.head.get_weights()
    layer.head.set_weights([kernel, np.asarray(parameters, np.float32)])
    return layer


def test_a_quarter_turn_is_numpys_clockwise_rot90():
    x = square_images(batch=1, size=6)
    out = turned(x, np.array([np.pi / 2], np.float32)).numpy()
    np.testing.assert_allclose(out[0, :, :, 0], np.rot90(x[0, :, :, 0], k=-1), atol=1e-5)


def test_sampling_a_turned_image_at_the_turned_transform_gives_the_same_output():
    # The identity the loss rests on: x' = turned(x, d) read at R(d) M equals x read at M.
    x = square_images(batch=1, size=8)
    theta = np.array([[0.8, 0.1, 0.05, -0.2, 0.9, 0.1]], np.float32)
    turn = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], np.float32)  # R(90 degrees)
    turned_theta = (turn @ np.vstack([theta.reshape(2, 3), [0, 0, 1]]))[:2].reshape(1, 6)
    direct = bilinear_sample(x, affine_grid(theta, (5, 5)))
    via_turn = bilinear_sample(
        turned(x, np.array([np.pi / 2], np.float32)), affine_grid(turned_theta, (5, 5))
    )
    np.testing.assert_allclose(via_turn.numpy(), direct.numpy(), atol=1e-5)


def numpy_turn(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


@pytest.mark.parametrize(
    "transform, parameters, as_matrix",
    [
        (
            "affine",
            [0.9, 0.2, 0.1, -0.1, 1.1, -0.3],
            lambda p: np.vstack([np.reshape(p, (2, 3)), [0, 0, 1]]),
        ),
        (
            "projective",
            [0.9, 0.2, 0.1, -0.1, 1.1, -0.3, 0.05, -0.02],
            lambda p: np.reshape([*p, 1.0], (3, 3)),
        ),
        (
            "similarity",
            [0.8, 0.3, 0.1, -0.2],
            lambda p: np.array([[p[0], -p[1], p[2]], [p[1], p[0], p[3]], [0, 0, 1]]),
        ),
    ],
)
def test_loss_of_a_constant_transform_is_its_distance_to_the_turned_one(
    transform, parameters, as_matrix
):
    # A head that ignores the image predicts M for x and for x' alike; the loss then compares
    # M with R(d) M, in the transform's own parameters.
    layer = constant_transformer(transform, parameters)
    angles = np.array([0.3, -1.2], np.float32)
    loss = equivariance_loss(layer, square_images(), angles).numpy()
    matrix = as_matrix(parameters)
    expected = []
    for angle in angles:
        target = numpy_turn(angle) @ matrix
        target = target / target[2, 2]
        flat = {
            "affine": target[:2].ravel(),
            "projective": target.ravel()[:8],
            "similarity": target[[0, 1, 0, 1], [0, 0, 2, 2]],
        }[transform]
        expected.append((np.asarray(parameters) - flat) ** 2)
    np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)


def test_identity_transformer_loss_for_a_quarter_turn_is_hand_computed():
    # M = I, R M = [[0, -1, 0], [1, 0, 0]]: squared differences 1, 1, 0, 1, 1, 0.
    layer = constant_transformer("affine", [1, 0, 0, 0, 1, 0])
    loss = equivariance_loss(layer, square_images(batch=1), np.array([np.pi / 2], np.float32))
    np.testing.assert_allclose(loss.numpy(), 4 / 6, rtol=1e-6)


def test_the_gradient_pulls_the_turned_side_only():
    # Constant head with bias b: loss = mean over batch and 6 entries of (b - R b)^2 with R b
    # held fixed, so d loss / d b = mean over the batch of 2 (b - R b) / 6.
    bias = np.array([0.9, 0.2, 0.1, -0.1, 1.1, -0.3], np.float32)
    layer = constant_transformer("affine", bias)
    angles = np.array([0.5, -0.7], np.float32)
    with tf.GradientTape() as tape:
        loss = equivariance_loss(layer, square_images(), angles)
    gradient = tape.gradient(loss, layer.head.bias).numpy()
    matrix = np.vstack([bias.reshape(2, 3), [0, 0, 1]])
    targets = [(numpy_turn(a) @ matrix)[:2].ravel() for a in angles]
    expected = np.mean([2 * (bias - t) / 6 for t in targets], axis=0)
    np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weight, max_angle_deg", [(1.0, 1.0), (2.0, 1.0), (0.5, 90.0)])
def test_the_layer_adds_weight_times_the_loss_for_angles_within_max_angle(weight, max_angle_deg):
    # Constant head B (2x3): R(a) turns each column of B, so the squared differences sum to
    # 4 sin^2(a/2) |B|^2 over the six entries. The layer's angles are the draws of the same
    # seeded generator, uniform in +-max_angle_deg.
    bias = np.array([0.9, 0.2, 0.1, -0.1, 1.1, -0.3], np.float32)
    layer = RotationEquivariance(constant_transformer("affine", bias), weight, max_angle_deg)
    x = square_images(batch=3)
    tf.random.set_seed(11)
    limit = np.radians(max_angle_deg)
    angles = tf.random.uniform([3], -limit, limit).numpy()
    tf.random.set_seed(11)
    np.testing.assert_array_equal(layer(x, training=True), x)
    expected = weight * np.mean(4 * np.sin(angles / 2) ** 2 * np.sum(bias**2) / 6)
    np.testing.assert_allclose(layer.losses[0].numpy(), expected, rtol=1e-4)
    # The bound at max_angle_deg does not lean on the generator: every angle is within it.
    assert layer.losses[0].numpy() <= weight * 4 * np.sin(limit / 2) ** 2 * np.sum(bias**2) / 6


def test_wrapper_trains_the_models_weights_with_the_loss_added_only_in_training():
    model = build_model(
        "st_cnn_affine", input_shape=(28, 28, 1), num_classes=10, st_output_size=(24, 24)
    )
    training = with_rotation_equivariance(model, weight=2.0, max_angle_deg=30)
    x = square_images(batch=4, size=28)
    np.testing.assert_allclose(training(x, training=False).numpy(), model(x).numpy(), atol=1e-6)
    assert not training.losses
    training(x, training=True)
    assert len(training.losses) == 1
    assert {id(w) for w in training.trainable_weights} == {id(w) for w in model.trainable_weights}
    # Off the identity the loss has a gradient for the localization net.
    transformer = training.get_layer("rotation_equivariance").transformer
    kernel, bias = transformer.head.get_weights()
    transformer.head.set_weights([RNG.normal(0, 0.05, kernel.shape).astype(np.float32), bias])
    with tf.GradientTape() as tape:
        training(x, training=True)
        loss = tf.add_n(training.losses)
    gradients = tape.gradient(loss, transformer.localization_net.trainable_weights)
    assert loss.numpy() > 0
    assert all(g is not None and np.abs(g.numpy()).sum() > 0 for g in gradients)


def test_wrapper_fits_on_a_generator_whose_images_have_no_static_shape():
    model = build_model("st_cnn_affine", input_shape=(28, 28, 1), num_classes=10)
    training = with_rotation_equivariance(model)
    training.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    batches = ((square_images(batch=4, size=28), np.arange(4)) for _ in range(2))
    history = training.fit(batches, steps_per_epoch=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"transform": "tps"}, "needs a transform of"),
        ({"weight": 0.0}, "weight must be > 0"),
        ({"max_angle_deg": 200}, "max_angle_deg must be in"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    transform = kwargs.pop("transform", "affine")
    layer = SpatialTransformer(keras.layers.GlobalAveragePooling2D(), (8, 8), transform=transform)
    with pytest.raises(ValueError, match=message):
        RotationEquivariance(layer, **kwargs)


def test_non_square_images_are_refused():
    layer = SpatialTransformer(keras.layers.GlobalAveragePooling2D(), (8, 8))
    with pytest.raises(ValueError, match="square images"):
        RotationEquivariance(layer)(keras.Input((8, 10, 1)))
