"""ModelCheck's query: real SavedModels that keep or break the serving contract, one flaw each.

The good model is the fixed linear classifier of the model server's tests, whose classes NumPy
computes; each broken one answers the canned request with one thing wrong.
"""

import numpy as np
import pytest
import tensorflow as tf

from components.model_check import canned_request, check_in_fresh_process, query
from pipeline.linear_savedmodel import IMAGE_SIZE, NUM_PIXELS, save_linear_classifier


def canned_pixels():
    """The canned images as the classifier sees them: 42 x 42 grey, in [0, 1]."""
    decoded = [
        tf.image.resize(tf.io.decode_image(image, channels=1, dtype=tf.float32), [IMAGE_SIZE] * 2)
        for image in canned_request()
    ]
    return np.stack([image.numpy().reshape(-1) for image in decoded])


class Flawed(tf.Module):
    """Answers the canned request with `flaw`: "sum" (probabilities do not sum to 1),
    "argmax" (classes are not their argmax), "rows" (one row too few), "rectify" (rectify
    answers one image too few)."""

    def __init__(self, flaw):
        super().__init__()
        self.flaw = flaw

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def classify(self, images):
        count = tf.shape(images)[0] - (1 if self.flaw == "rows" else 0)
        logits = tf.tile(tf.range(10, dtype=tf.float32)[None], [count, 1])
        probabilities = logits if self.flaw == "sum" else tf.nn.softmax(logits)
        classes = tf.argmin if self.flaw == "argmax" else tf.argmax
        return {"probabilities": probabilities, "classes": classes(logits, axis=1)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def rectify(self, images):
        count = tf.shape(images)[0] - (1 if self.flaw == "rectify" else 0)
        return {"rectified": tf.zeros([count, IMAGE_SIZE, IMAGE_SIZE, 1])}


def save_flawed(path, flaw):
    module = Flawed(flaw)
    signatures = {"serving_default": module.classify, "rectify": module.rectify}
    if flaw == "no rectify":
        del signatures["rectify"]
    tf.saved_model.save(module, str(path), signatures=signatures)
    return str(path)


def test_a_model_that_keeps_the_contract_answers_with_numpys_classes(tmp_path):
    rng = np.random.default_rng(0)
    weights, bias = rng.normal(0, 0.05, (NUM_PIXELS, 10)), rng.normal(0, 0.1, 10)
    save_linear_classifier(tmp_path / "good", weights, bias)
    logits = canned_pixels() @ weights + bias
    answer = query(str(tmp_path / "good"))
    assert answer == {"answered": 3, "classes": logits.argmax(axis=1).tolist()}


@pytest.mark.parametrize(
    ("flaw", "words"),
    [
        ("sum", "probabilities do not sum to 1"),
        ("argmax", "classes are not the argmax of probabilities"),
        ("rows", "expected 3 answers, got (2, 10)"),
        ("rectify", "rectify answered 2 images for 3"),
        ("no rectify", "has no 'rectify' signature"),
    ],
)
def test_a_model_that_breaks_the_contract_is_refused_naming_the_flaw(tmp_path, flaw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        query(save_flawed(tmp_path / "model", flaw))


def test_the_fresh_process_reports_the_flaw_in_words(tmp_path):
    passed, reason = check_in_fresh_process(save_flawed(tmp_path / "model", "argmax"))
    assert not passed
    assert reason == "the check failed: ValueError: classes are not the argmax of probabilities"
