"""Checking one encoded image against the data set's shape.

Images are decoded with `tf.io.decode_image`, the decoder the trainer and the serving signature
use, so an image that passes here also decodes there (Pillow, for one, accepts PNGs whose last
chunk checksums are wrong; TensorFlow rejects them).
"""

import re

import tensorflow as tf

# Leading bytes of the formats the data contract allows (PNG specification section 5.2; JPEG
# files start with an SOI marker followed by another marker).
_SIGNATURES = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}


def image_format(data):
    """'PNG' or 'JPEG' when `data` starts like such a file, else None."""
    for name, signature in _SIGNATURES.items():
        if data.startswith(signature):
            return name
    return None


def image_problem(data, shape):
    """What is wrong with encoded image `data` for a data set of `shape` (H, W, C); None if OK."""
    found_format = image_format(data)
    if found_format is None:
        return f"is not a PNG or JPEG file (starts with {data[:8]!r})"
    try:
        decoded_shape = tuple(tf.io.decode_image(data, expand_animations=False).shape)
    except tf.errors.InvalidArgumentError as error:
        return f"is not a decodable {found_format} image ({tf_reason(error.message)})"
    if decoded_shape != tuple(shape):
        return f"decodes to shape {format_shape(decoded_shape)}, expected {format_shape(shape)}"
    return None


def tf_reason(message):
    """TensorFlow's words in an eager op's error message, without the op's wrapping."""
    message = re.sub(r"^\{\{[^}]*\}\}\s*", "", message.strip())
    return re.sub(r"\s*\[Op:\w+\](\s*name:.*)?$", "", message)


def format_shape(shape):
    """`(42, 42, 1)` -> '42x42x1'."""
    return "x".join(str(size) for size in shape)
