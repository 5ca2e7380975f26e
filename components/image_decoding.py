"""Checking one encoded image against the data set's shape.

Images are decoded with `tf.io.decode_image`, the decoder the trainer and the serving signature
use, so an image that passes here also decodes there (Pillow, for one, accepts PNGs whose last
chunk checksums are wrong; TensorFlow rejects them). An image whose header gives it more pixels
than the data set's images have is refused before decoding: a PNG of 16,000 x 16,000 zeros is
250 KB but decodes into 256 MB.
"""

import re
import struct

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
        height, width = _header_size(data, found_format)
        if height * width > shape[0] * shape[1]:
            return (
                f"is {height}x{width} by its header, expected {format_shape(shape)} (not decoded)"
            )
        decoded_shape = tuple(tf.io.decode_image(data, expand_animations=False).shape)
    except tf.errors.InvalidArgumentError as error:
        return f"is not a decodable {found_format} image ({tf_reason(error.message)})"
    if decoded_shape != tuple(shape):
        return f"decodes to shape {format_shape(decoded_shape)}, expected {format_shape(shape)}"
    return None


def _header_size(data, found_format):
    """(height, width) of a PNG or JPEG as its header gives them, without decoding it; (0, 0)
    for a PNG too short to hold them (its decoding fails)."""
    if found_format == "JPEG":  # the size is in the start-of-frame segment, anywhere
        return tuple(int(size) for size in tf.image.extract_jpeg_shape(data)[:2])
    if len(data) < 24:
        return 0, 0
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk, first of every PNG
    return height, width


def tf_reason(message):
    """TensorFlow's words in an eager op's error message, without the op's wrapping."""
    message = re.sub(r"^\{\{[^}]*\}\}\s*", "", message.strip())
    return re.sub(r"\s*\[Op:\w+\](\s*name:.*)?$", "", message)


def format_shape(shape):
    """`(42, 42, 1)` -> '42x42x1'."""
    return "x".join(str(size) for size in shape)
