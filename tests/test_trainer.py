"""The Trainer module and the export signatures, on tiny models and data.

Oracles: Pillow decodes and converts the same files (grayscale by ITU-R 601 luma, bilinear
resize); an untrained ST model starts at the identity transform, so with an output as large as
its input its `rectify` signature must return the input unchanged.
"""

import io
import itertools
import os
import pathlib
import shutil
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tfx.components.trainer.fn_args_utils import FnArgs

from pipeline.configs import PipelineConfig
from stn_model import serving, trainer
from stn_model.models import build_model, find_spatial_transformer

SIZE = 42


def encode(pixels, kind="PNG", **options):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind, **options)
    return buffer.getvalue()


def pillow_decode(data, size=SIZE):
    """float32 [size, size, 1] in [0, 1]: Pillow's grayscale conversion and bilinear resize."""
    image = Image.open(io.BytesIO(data)).convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return (np.asarray(image, dtype=np.float32) / 255.0)[..., None]


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(7)
    # Smooth images, so that resampling differences between libraries stay small.
    coarse = rng.integers(0, 256, (4, 7, 7, 3)).astype(np.uint8)
    return [np.asarray(Image.fromarray(c).resize((70, 56), Image.BICUBIC)) for c in coarse]


def test_trainer_defaults_are_the_pipeline_defaults():
    """run_fn called outside the pipeline trains with the recipe the pipeline passes it."""
    defaults = vars(trainer.TrainingOptions())
    for name, value in PipelineConfig().trainer_custom_config().items():
        assert defaults[name] == value, name


def test_the_training_code_digest_follows_the_sources_not_their_location(tmp_path):
    digest = trainer.training_code_digest()
    copy = tmp_path / "stn_model"
    shutil.copytree(pathlib.Path(trainer.__file__).parent, copy)
    assert trainer.training_code_digest(copy) == digest
    (copy / "stale.pyc").write_bytes(b"compiled")
    (copy / "native" / "notes.txt").write_text("not a source")
    assert trainer.training_code_digest(copy) == digest
    sampler = copy / "native" / "bilinear_sampler.cc"
    sampler.write_text(sampler.read_text() + "\n")
    edited = trainer.training_code_digest(copy)
    assert edited != digest
    (copy / "layers.py").rename(copy / "layers_renamed.py")
    assert trainer.training_code_digest(copy) not in (digest, edited)


def test_gray_png_of_the_model_size_decodes_exactly():
    gray = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    decoded = serving.decode_images([encode(gray)], (SIZE, SIZE)).numpy()
    np.testing.assert_array_equal(np.round(decoded[0, ..., 0] * 255), gray)
    np.testing.assert_allclose(decoded[0, ..., 0], gray / 255.0, atol=1e-7)


def test_rgb_png_of_another_size_is_converted_like_pillow(pixels):
    data = [encode(p) for p in pixels]  # 56 x 70 RGB
    decoded = serving.decode_images(data, (SIZE, SIZE)).numpy()
    expected = np.stack([pillow_decode(d) for d in data])
    assert decoded.shape == (len(data), SIZE, SIZE, 1)
    assert np.abs(decoded - expected).max() < 0.03
    assert np.abs(decoded - expected).mean() < 0.005


def test_jpeg_and_rgba_are_converted_like_pillow(pixels):
    jpeg = encode(pixels[0], "JPEG", quality=95)
    rgba = np.concatenate([pixels[1], np.full((*pixels[1].shape[:2], 1), 255, np.uint8)], -1)
    data = [jpeg, encode(rgba)]
    decoded = serving.decode_images(data, (SIZE, SIZE)).numpy()
    expected = np.stack([pillow_decode(d) for d in data])
    assert np.abs(decoded - expected).max() < 0.04


def test_bytes_that_are_no_image_fail():
    with pytest.raises(tf.errors.InvalidArgumentError):
        serving.decode_images([b"not an image"], (SIZE, SIZE))


def with_size(data, kind, width, height):
    """`data`, an encoded image, with its header saying width x height (the pixels unchanged)."""
    data = bytearray(data)
    if kind == "PNG":
        data[16:24] = struct.pack(">II", width, height)
    else:  # JPEG: the start-of-frame segment
        start = data.index(b"\xff\xc0")
        data[start + 5 : start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
def test_an_image_of_too_many_pixels_is_refused_before_it_is_decoded(kind):
    smalls = [encode(np.zeros((6, 8), np.uint8), other) for other in ("PNG", "JPEG")]
    assert serving.decode_images(smalls, (SIZE, SIZE)).shape == (2, SIZE, SIZE, 1)
    side = 4097  # 4097 x 4097 is over MAX_IMAGE_PIXELS; 4096 x 4096 is not
    assert side * side > serving.MAX_IMAGE_PIXELS >= (side - 1) ** 2
    huge = with_size(encode(np.zeros((6, 8), np.uint8), kind), kind, side, side)
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than 16777216 pixels"):
        serving.decode_images([*smalls, huge, *smalls], (SIZE, SIZE))  # anywhere in a batch
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than"):
        serving.decode_image(huge, (SIZE, SIZE))


@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
def test_an_image_of_max_image_pixels_is_decoded_and_one_more_column_is_refused(kind):
    data = encode(np.zeros((2048, 8192), np.uint8), kind)  # 8192 x 2048 = 4096 x 4096 pixels
    assert serving.decode_images([data], (SIZE, SIZE)).shape == (1, SIZE, SIZE, 1)
    wider = with_size(data, kind, 8193, 2048)
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than 16777216 pixels"):
        serving.decode_images([wider], (SIZE, SIZE))


@pytest.mark.parametrize("kind", ["GIF", "BMP"])
def test_images_tensorflow_decodes_but_the_contract_does_not_name_are_refused(kind):
    # A GIF decodes to the size of its largest frame, which may sit anywhere in the file.
    other = encode(np.zeros((6, 8), np.uint8), kind)
    assert tf.io.decode_image(other, expand_animations=False).shape[:2] == (6, 8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="an image is not a PNG or JPEG"):
        serving.decode_images([encode(np.zeros((6, 8), np.uint8)), other], (SIZE, SIZE))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An untrained ST-CNN whose transformer outputs 42 x 42 (identity at start), exported."""
    model = build_model("st_cnn_affine", input_shape=(SIZE, SIZE, 1), st_output_size=(SIZE, SIZE))
    export_dir = str(tmp_path_factory.mktemp("export") / "model")
    serving.export_saved_model(model, export_dir, transformer=find_spatial_transformer(model))
    return model, tf.saved_model.load(export_dir)


def test_export_has_the_three_signatures(exported):
    _, loaded = exported
    assert set(loaded.signatures) == {"serving_default", "rectify", "serving_examples"}
    inputs = loaded.signatures["serving_default"].structured_input_signature[1]
    assert inputs == {"images": tf.TensorSpec([None], tf.string, name="images")}


def test_serving_default_answers_png_rgb_and_jpeg(exported, pixels):
    model, loaded = exported
    gray = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    data = [encode(gray), encode(pixels[2]), encode(pixels[3], "JPEG", quality=95)]
    answer = loaded.signatures["serving_default"](images=tf.constant(data))
    probabilities, classes = answer["probabilities"].numpy(), answer["classes"]
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 10)
    assert classes.dtype == tf.int64
    np.testing.assert_array_equal(classes.numpy(), probabilities.argmax(axis=1))
    expected = model.predict(np.stack([pillow_decode(d) for d in data]), verbose=0)
    np.testing.assert_allclose(probabilities[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(probabilities[1:], expected[1:], atol=0.02)


def test_rectify_returns_the_input_and_the_pixel_centres_under_the_identity_transform(exported):
    _, loaded = exported
    gray = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    outputs = loaded.signatures["rectify"](images=tf.constant([encode(gray)]))
    np.testing.assert_allclose(outputs["rectified"].numpy()[0, ..., 0], gray / 255.0, atol=1e-5)
    # Pixel j's centre in normalized coordinates (align_corners=False): (2j + 1) / SIZE - 1.
    centres = (2 * np.arange(SIZE) + 1) / SIZE - 1
    x, y = np.meshgrid(centres, centres)
    assert outputs["grid"].dtype == tf.float32
    np.testing.assert_allclose(outputs["grid"].numpy()[0], np.stack([x, y], -1), atol=1e-6)


def test_serving_examples_agrees_with_serving_default(exported, pixels):
    _, loaded = exported
    data = [encode(p) for p in pixels]
    examples = [example(d, 0).SerializeToString() for d in data]
    by_examples = loaded.signatures["serving_examples"](examples=tf.constant(examples))
    by_images = loaded.signatures["serving_default"](images=tf.constant(data))
    np.testing.assert_allclose(
        by_examples["probabilities"].numpy(), by_images["probabilities"].numpy(), atol=1e-6
    )


def test_the_exported_signatures_refuse_an_image_of_too_many_pixels(exported):
    _, loaded = exported
    huge = with_size(encode(np.zeros((6, 8), np.uint8)), "PNG", 5000, 5000)
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than 16777216 pixels"):
        loaded.signatures["serving_default"](images=tf.constant([huge]))
    examples = tf.constant([example(huge, 0).SerializeToString()])
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than 16777216 pixels"):
        loaded.signatures["serving_examples"](examples=examples)


def example(image_bytes, label):
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def write_examples(path, count, seed):
    """`count` gzipped tf.Examples of random 42 x 42 PNGs; returns their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for label in labels:
            gray = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
            writer.write(example(encode(gray), int(label)).SerializeToString())
    return labels


def train(root, train_count, train_steps, seed, eval_steps=None, **custom_config):
    """`run_fn` on random examples (16 to evaluate on) written under `root`; returns its FnArgs."""
    write_examples(str(root / "Split-train" / "data.gz"), train_count, seed=seed)
    write_examples(str(root / "Split-eval" / "data.gz"), 16, seed=seed + 1)
    fn_args = FnArgs(
        train_files=[str(root / "Split-train" / "*")],
        eval_files=[str(root / "Split-eval" / "*")],
        serving_model_dir=str(root / "serving"),
        model_run_dir=str(root / "logs"),
        train_steps=train_steps,
        eval_steps=eval_steps,
        custom_config={"batch_size": 16, **custom_config},
    )
    trainer.run_fn(fn_args)
    return fn_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train(tmp_path_factory.mktemp("trainer"), 48, train_steps=4, seed=1)


def test_run_fn_exports_a_servable_model(trained):
    loaded = tf.saved_model.load(trained.serving_model_dir)
    assert {"serving_default", "rectify", "serving_examples"} <= set(loaded.signatures)
    gray = np.zeros((SIZE, SIZE), np.uint8)
    answer = loaded.signatures["serving_default"](images=tf.constant([encode(gray)] * 2))
    np.testing.assert_allclose(answer["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)
    rectified = loaded.signatures["rectify"](images=tf.constant([encode(gray)]))["rectified"]
    assert rectified.shape == (1, 28, 28, 1)  # the ST-CNN's transformer writes 28 x 28


def test_run_fn_writes_tensorboard_logs(trained):
    events = tf.io.gfile.glob(os.path.join(trained.model_run_dir, "*", "events.out.tfevents.*"))
    assert {os.path.basename(os.path.dirname(path)) for path in events} == {"train", "validation"}


def test_eval_steps_beyond_the_eval_split_validate_every_epoch(tmp_path, caplog):
    with caplog.at_level("INFO", logger=trainer.__name__):  # the eval split is one batch
        train(tmp_path, 48, train_steps=9, seed=3, eval_steps=2, model="cnn")
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs) == 3
    assert all("val_accuracy" in line for line in epochs), epochs


def test_one_replica_of_a_distribution_strategy_trains_and_validates(tmp_path):
    """One Kubernetes worker (MultiWorkerMirroredStrategy) has one replica, but Keras still gets
    distributed datasets, which need a step count: validation must have one."""
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        fn_args = train(tmp_path, 32, train_steps=2, seed=4, model="cnn")
    assert tf.saved_model.load(fn_args.serving_model_dir).signatures["serving_default"]


def test_warm_start_loads_the_pushed_weights(trained):
    loaded = tf.saved_model.load(trained.serving_model_dir)
    model = build_model("st_cnn_affine", input_shape=(SIZE, SIZE, 1), num_classes=10)
    assert trainer.warm_start(model, trained.serving_model_dir)
    assert len(model.variables) == len(loaded.weights)
    for ours, pushed in zip(model.variables, loaded.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), pushed.numpy())


def test_warm_start_from_another_model_type_keeps_fresh_weights(trained):
    model = build_model("cnn", input_shape=(SIZE, SIZE, 1), num_classes=10)
    fresh = model.get_weights()
    assert not trainer.warm_start(model, trained.serving_model_dir)
    for now, before in zip(model.get_weights(), fresh, strict=True):
        np.testing.assert_array_equal(now, before)


def test_model_shape_and_equivariance_options_reach_the_trained_model(tmp_path, caplog):
    """The options of the README's best R recipe: the export computes what a model built with
    them computes, given its weights, and not what one built without the second pass does."""
    shape = {"st_iterations": 2, "full_resolution_localization": True}
    shape["localization_hidden_units"] = 8
    with caplog.at_level("INFO", logger=trainer.__name__):
        # A large step, so that two of them move the transform well away from the identity.
        fn_args = train(
            tmp_path,
            32,
            train_steps=2,
            seed=5,
            learning_rate=0.05,
            equivariance_weight=2.0,
            **shape,
        )
    assert "training st_cnn_affine_equivariant:" in caplog.text

    loaded = tf.saved_model.load(fn_args.serving_model_dir)
    gray = np.random.default_rng(8).integers(0, 256, (2, SIZE, SIZE), dtype=np.uint8)
    served = loaded.signatures["rectify"](images=tf.constant([encode(g) for g in gray]))
    weights = [w.numpy() for w in loaded.weights]

    def rebuilt(**options):
        """(rectified, grid) of a model built with `options` and the exported weights."""
        model = build_model("st_cnn_affine", input_shape=(SIZE, SIZE, 1), **options)
        model.set_weights(weights)
        rectified, _, grid = find_spatial_transformer(model).rectify(gray[..., None] / 255.0)
        return rectified.numpy(), grid.numpy()

    rectified, grid = rebuilt(**shape)
    np.testing.assert_allclose(served["rectified"].numpy(), rectified, atol=1e-5)
    np.testing.assert_allclose(served["grid"].numpy(), grid, atol=1e-5)
    one_pass, _ = rebuilt(**{**shape, "st_iterations": 1})
    assert np.abs(served["rectified"].numpy() - one_pass).max() > 1e-2


def test_the_equivariance_loss_wraps_the_model_only_when_weighted():
    model = build_model("st_cnn_affine", input_shape=(SIZE, SIZE, 1))
    assert trainer._regularized(model, trainer.TrainingOptions()) is model
    options = trainer.TrainingOptions(equivariance_weight=3.0, equivariance_angle=30.0)
    wrapped = trainer._regularized(model, options)
    layer = wrapped.get_layer("rotation_equivariance")
    assert (layer.weight, layer.max_angle) == (3.0, pytest.approx(np.radians(30.0)))
    assert {id(v) for v in wrapped.variables} == {id(v) for v in model.variables}
    with pytest.raises(ValueError, match="transform of"):
        trainer._regularized(build_model("st_cnn_tps", input_shape=(SIZE, SIZE, 1)), options)


def test_count_records_counts_every_example(tmp_path):
    write_examples(str(tmp_path / "a.gz"), 5, seed=3)
    write_examples(str(tmp_path / "b.gz"), 7, seed=4)
    assert trainer.count_records([str(tmp_path / "*.gz")]) == 12


def test_custom_config_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown keys \\['epoch'\\]"):
        trainer.TrainingOptions.from_custom_config({"epoch": 3})
    with pytest.raises(ValueError, match="'batch_size'"):
        trainer.TrainingOptions.from_custom_config({"batch_size": 0})
    with pytest.raises(ValueError, match="no files match"):
        trainer.count_records(["/nonexistent/Split-train/*"])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("full_resolution_localization", "false"),
        ("full_resolution_localization", 1),
        ("equivariance_weight", "0.5"),
        ("equivariance_weight", -1.0),
        ("equivariance_weight", float("nan")),
        ("equivariance_angle", 400),
        ("equivariance_angle", 0),
        ("learning_rate", True),
        ("learning_rate", float("inf")),
        ("warm_start_model", 5),
        ("localization_hidden_units", 0),
        ("localization_hidden_units", 8.0),
        ("seed", -1),
        ("epochs", 2.0),
        ("model", ""),
        ("code_digest", 5),
    ],
)
def test_custom_config_values_of_the_wrong_type_or_range_are_rejected(key, value):
    with pytest.raises(ValueError, match=rf"^custom_config\['{key}'\] must be .*, got "):
        trainer.TrainingOptions.from_custom_config({key: value})


def test_custom_config_accepts_every_valid_kind_of_value():
    config = {
        "full_resolution_localization": True,
        "equivariance_weight": 1,
        "equivariance_angle": 180,
        "learning_rate": 0.5,
        "warm_start_model": "/serving/stn/7",
        "localization_hidden_units": 50,
        "seed": 0,
    }
    options = trainer.TrainingOptions.from_custom_config(config)
    assert {key: getattr(options, key) for key in config} == config


@pytest.mark.parametrize(
    ("train_steps", "num_train", "global_batch", "expected"),
    [
        (10, 300, 128, (4, 3)),  # 3 steps a pass: 4 epochs of 3 steps, 2 more than asked
        (12, 300, 128, (4, 3)),
        (100, 5000, 128, (3, 34)),  # 40 steps a pass: 3 epochs, 102 steps
        (997, 20_000, 128, (7, 143)),  # a prime still trains in epochs of about a pass
        (3, 10_000, 128, (1, 3)),  # less than a pass
        (5, 0, 128, (5, 1)),
    ],
)
def test_train_steps_are_split_into_whole_epochs_of_about_a_pass(
    train_steps, num_train, global_batch, expected
):
    epochs, steps_per_epoch = trainer.split_steps(train_steps, num_train, global_batch)
    assert (epochs, steps_per_epoch) == expected
    assert train_steps <= epochs * steps_per_epoch < train_steps + epochs


def test_the_learning_rate_warms_up_over_a_tenth_of_training_then_decays_to_5_percent():
    schedule = trainer.learning_rate_schedule(2e-3, 100)
    rate = [float(schedule(step)) for step in range(101)]
    np.testing.assert_allclose(rate[:11], np.linspace(0.0, 2e-3, 11), atol=1e-9)  # linear
    # then cosine: the peak at step 10, 5% of it at 100, halfway between them at step 55
    np.testing.assert_allclose(rate[55], 2e-3 * (0.05 + 0.95 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(rate[100], 2e-3 * 0.05, rtol=1e-5)
    assert all(a > b for a, b in itertools.pairwise(rate[10:]))
    short = trainer.learning_rate_schedule(2e-3, 9)  # under 10 steps: no warm-up
    assert float(short(0)) == pytest.approx(2e-3)


def test_only_the_chief_exports():
    spec = tf.train.ClusterSpec({"worker": ["a:1", "b:1"]})
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver
    assert trainer.is_chief(None)
    assert trainer.is_chief(resolver(spec, task_type="worker", task_id=0))
    assert not trainer.is_chief(resolver(spec, task_type="worker", task_id=1))
    with_chief = tf.train.ClusterSpec({"chief": ["c:1"], "worker": ["a:1"]})
    assert trainer.is_chief(resolver(with_chief, task_type="chief", task_id=0))
    assert not trainer.is_chief(resolver(with_chief, task_type="worker", task_id=0))
