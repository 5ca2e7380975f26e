"""The model's preprocessing and export signatures (TensorFlow only, no TFX).

Training and serving share one preprocessing: `DecodeImages` turns encoded PNG/JPEG bytes into
float images in [0, 1] of the model's input shape, inside the graph; an image that is not a PNG
or JPEG, or whose header says it has over `MAX_IMAGE_PIXELS` (4096 x 4096) pixels, is refused
before it is decoded. The exported SavedModel has

- ``serving_default``: ``images`` (1-D tf.string, encoded PNG or JPEG) -> ``probabilities``
  [B, num_classes] float32 and ``classes`` [B] int64;
- ``rectify``: ``images`` -> ``rectified``, the image the classifier sees (the spatial
  transformer's output; the decoded input itself for a model without a transformer), and for
  a model with one ``grid`` [B, h, w, 2] float32, the normalized (x, y) input coordinates in
  [-1, 1] it sampled each output pixel at;
- ``serving_examples``: ``examples`` (serialized tf.Examples with an ``image`` bytes feature)
  -> the same outputs as ``serving_default``; TFMA evaluates through it.
"""

import tensorflow as tf
import tf_keras as keras

from stn_model.checks import check_size
from stn_model.sampling import portable_ops

IMAGES_KEY = "images"
EXAMPLES_KEY = "examples"
IMAGE_FEATURE = "image"
SERVING_SIGNATURE = "serving_default"
RECTIFY_SIGNATURE = "rectify"
EXAMPLES_SIGNATURE = "serving_examples"
# Larger images are refused before decoding: a PNG of 16,000 x 16,000 zeros is 250 KB but
# decodes into 1 GB of floats. This allows a 12-megapixel photo.
MAX_IMAGE_PIXELS = 4096 * 4096


def _model_image_size(model):
    """(height, width) of `model`'s input, which must be one-channel images [B, H, W, 1]."""
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 1:
        raise ValueError(f"model must take images [B, H, W, 1], its input shape is {shape}")
    return check_size(shape[1:3], "image_size")


def _check_headers(encoded):
    """An op that fails unless every image of `encoded` (1-D tf.string) is a PNG or JPEG whose
    header gives it at most `MAX_IMAGE_PIXELS` pixels: decoding a larger one could take
    gigabytes. (TensorFlow's decoder takes GIF and BMP too, but a GIF's size is that of its
    largest frame, which may sit anywhere in the file.)"""

    def starts_with(magic):
        return tf.equal(tf.strings.substr(encoded, 0, len(magic)), magic)

    is_png, is_jpeg = starts_with(b"\x89PNG\r\n\x1a\n"), starts_with(b"\xff\xd8\xff")
    # A PNG's width and height: big-endian 4-byte integers at bytes 16 and 20.
    header = tf.cast(tf.io.decode_raw(encoded, tf.uint8, fixed_length=24), tf.int64)
    png_sides = tf.reshape(header[:, 16:24], [-1, 2, 4]) * [256**3, 256**2, 256, 1]
    pixels = tf.where(is_png, tf.reduce_prod(tf.reduce_sum(png_sides, axis=2), axis=1), 0)
    jpeg_pixels = tf.map_fn(  # a JPEG's size is in its start-of-frame segment, anywhere
        lambda image: tf.reduce_prod(tf.image.extract_jpeg_shape(image, tf.int64)[:2]),
        tf.boolean_mask(encoded, is_jpeg),
        fn_output_signature=tf.int64,
    )
    pixels = tf.tensor_scatter_nd_update(pixels, tf.where(is_jpeg), jpeg_pixels)
    return tf.group(
        tf.debugging.Assert(tf.reduce_all(is_png | is_jpeg), ["an image is not a PNG or JPEG"]),
        tf.debugging.Assert(
            tf.reduce_all(pixels <= MAX_IMAGE_PIXELS),
            [f"an image is larger than {MAX_IMAGE_PIXELS} pixels:", tf.reduce_max(pixels)],
        ),
    )


def _decode(encoded, height, width):
    """One encoded image (scalar tf.string) -> float32 [height, width, 1] in [0, 1]."""
    image = tf.io.decode_image(encoded, dtype=tf.float32, expand_animations=False)
    channels = tf.shape(image)[-1]
    image = tf.cond(
        channels >= 3,
        lambda: tf.image.rgb_to_grayscale(image[..., :3]),
        lambda: image[..., :1],
    )
    same_size = tf.reduce_all(tf.shape(image)[:2] == [height, width])
    image = tf.cond(
        same_size,
        lambda: image,
        lambda: tf.image.resize(image, [height, width], antialias=True),
    )
    return tf.ensure_shape(image, [height, width, 1])


def decode_image(encoded, image_size):
    """One encoded PNG/JPEG (scalar tf.string) -> float32 [H, W, 1] in [0, 1].

    Colour images become grayscale (ITU-R 601 luma, alpha dropped); images of another size
    are resized bilinearly to `image_size`. Another kind of image, or one of over
    `MAX_IMAGE_PIXELS` pixels, is an InvalidArgumentError, raised before it is decoded.
    """
    height, width = check_size(image_size, "image_size")
    with tf.control_dependencies([_check_headers(tf.reshape(encoded, [1]))]):
        return _decode(encoded, height, width)


def decode_images(encoded, image_size):
    """A batch of encoded PNG/JPEG images (1-D tf.string) -> float32 [B, H, W, 1] in [0, 1],
    as `decode_image` decodes each."""
    height, width = check_size(image_size, "image_size")
    encoded = tf.convert_to_tensor(encoded, dtype=tf.string)
    encoded = tf.reshape(encoded, [-1])
    with tf.control_dependencies([_check_headers(encoded)]):
        return tf.map_fn(
            lambda item: _decode(item, height, width),
            encoded,
            fn_output_signature=tf.TensorSpec([height, width, 1], tf.float32),
        )


class DecodeImages(keras.layers.Layer):
    """Keras layer: encoded PNG/JPEG bytes [B] (or [B, 1]) -> float32 [B, H, W, 1] in [0, 1]."""

    def __init__(self, image_size, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.image_size = check_size(image_size, "image_size")

    def call(self, encoded):
        return decode_images(encoded, self.image_size)

    def get_config(self):
        return {**super().get_config(), "image_size": list(self.image_size)}


def with_decoder(model, name=None):
    """`model` (float images [B, H, W, 1] -> probabilities) behind a `DecodeImages` layer.

    The result takes encoded images (input name ``images``) and shares the weights of `model`.
    """
    height, width = _model_image_size(model)
    images = keras.Input(shape=(), dtype=tf.string, name=IMAGES_KEY)
    decoded = DecodeImages((height, width), name="decode_images")(images)
    return keras.Model(images, model(decoded), name=name or f"{model.name}_on_bytes")


def export_saved_model(model, export_dir, transformer=None):
    """Save `model` with the ``serving_default``, ``rectify`` and ``serving_examples`` signatures.

    `model` maps float images [B, H, W, 1] in [0, 1] to class probabilities [B, num_classes];
    `transformer` is its `SpatialTransformer`, which reads those images (None: it has none).
    """
    height, width = _model_image_size(model)
    module = tf.Module()
    # The weights only, not the Keras objects: saving those would trace every layer again.
    module.weights = list(model.variables)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGES_KEY)])
    def serve(images):
        probabilities = model(decode_images(images, (height, width)), training=False)
        probabilities = tf.cast(probabilities, tf.float32)
        return {
            "probabilities": probabilities,
            "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int64),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGES_KEY)])
    def rectify(images):
        decoded = decode_images(images, (height, width))
        if transformer is None:
            return {"rectified": decoded}
        rectified, _, grid = transformer.rectify(decoded, training=False)
        return {"rectified": tf.cast(rectified, tf.float32), "grid": grid}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_KEY)])
    def serve_examples(examples):
        spec = {IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)}
        return serve(tf.io.parse_example(examples, spec)[IMAGE_FEATURE])

    module.serve, module.rectify, module.serve_examples = serve, rectify, serve_examples
    # Traced with TF ops only: TF Serving and fresh processes cannot run the native sampler.
    with portable_ops():
        signatures = {
            SERVING_SIGNATURE: serve.get_concrete_function(),
            RECTIFY_SIGNATURE: rectify.get_concrete_function(),
            EXAMPLES_SIGNATURE: serve_examples.get_concrete_function(),
        }
        tf.saved_model.save(module, export_dir, signatures=signatures)
    return export_dir
