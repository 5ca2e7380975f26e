"""A SavedModel with the serving contract and a fixed linear classifier.

It stands in for a trained STN wherever the model server itself is under test (tests, the
serving benchmark): its answers are `softmax(pixels @ weights + bias)`, which NumPy can check.
The contract is the one stn_model/serving.py exports: signature `serving_default` takes
`images`, a 1-D tf.string tensor of encoded PNG or JPEG images, and returns `probabilities`
[B, C] float32 and `classes` [B] int64; signature `rectify` returns the 42x42 grayscale images
the classifier sees; signature `serving_examples` takes `examples`, serialized tf.Examples with
an `image` bytes feature, and answers as `serving_default`.
"""

import numpy as np
import tensorflow as tf

IMAGE_SIZE = 42
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE


class _LinearClassifier(tf.Module):
    def __init__(self, weights, bias):
        super().__init__()
        self.weights = tf.Variable(weights, dtype=tf.float32, trainable=False)
        self.bias = tf.Variable(bias, dtype=tf.float32, trainable=False)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def classify(self, images):
        pixels = tf.reshape(self._decode(images), [-1, NUM_PIXELS])
        logits = tf.matmul(pixels, self.weights) + self.bias
        return {
            "probabilities": tf.nn.softmax(logits),
            "classes": tf.argmax(logits, axis=1, output_type=tf.int64),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def classify_examples(self, examples):
        spec = {"image": tf.io.FixedLenFeature([], tf.string)}
        return self.classify(tf.io.parse_example(examples, spec)["image"])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def rectify(self, images):
        return {"rectified": self._decode(images)}

    @staticmethod
    def _decode(images):
        def decode_one(encoded):
            image = tf.io.decode_image(
                encoded, channels=1, dtype=tf.float32, expand_animations=False
            )
            return tf.image.resize(image, [IMAGE_SIZE, IMAGE_SIZE])

        return tf.map_fn(
            decode_one,
            images,
            fn_output_signature=tf.TensorSpec([IMAGE_SIZE, IMAGE_SIZE, 1], tf.float32),
        )


def save_linear_classifier(export_dir, weights, bias):
    """Write the classifier `softmax(pixels / 255 @ weights + bias)` as a SavedModel.

    `weights` is [42 * 42, num_classes] over the row-major grayscale pixels scaled to [0, 1];
    `bias` is [num_classes].
    """
    weights = np.asarray(weights, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    if weights.ndim != 2 or weights.shape[0] != NUM_PIXELS:
        raise ValueError(
            f"weights must have shape [{NUM_PIXELS}, num_classes], got {weights.shape}"
        )
    if bias.shape != (weights.shape[1],):
        raise ValueError(f"bias must have shape [{weights.shape[1]}], got {bias.shape}")
    module = _LinearClassifier(weights, bias)
    tf.saved_model.save(
        module,
        str(export_dir),
        signatures={
            "serving_default": module.classify,
            "rectify": module.rectify,
            "serving_examples": module.classify_examples,
        },
    )
